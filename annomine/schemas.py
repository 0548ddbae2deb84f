"""Schemas of every annomine table, in one place.

Sail does not enforce Delta schemas, so `annomine.tables` checks each DataFrame against these
before writing. Each entry: the logical table name, its schema (a DDL string), its key (the
columns MERGE matches on; one row per key), and the job that writes it. `docs/tables.md`
describes them for users.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyspark.sql import types as T

from annomine.vocabulary import CHANNELS

_SIMPLE_TYPES = {
    "string": T.StringType(),
    "int": T.IntegerType(),
    "bigint": T.LongType(),
    "long": T.LongType(),
    "double": T.DoubleType(),
    "float": T.FloatType(),
    "boolean": T.BooleanType(),
    "timestamp": T.TimestampType(),
    "date": T.DateType(),
}


def parse_type(text: str) -> T.DataType:
    text = text.strip().lower()
    if text in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[text]
    match = re.fullmatch(r"array<(.+)>", text)
    if match:
        return T.ArrayType(parse_type(match.group(1)), containsNull=True)
    match = re.fullmatch(r"map<([^,]+),(.+)>", text)
    if match:
        return T.MapType(parse_type(match.group(1)), parse_type(match.group(2)), valueContainsNull=True)
    raise ValueError(f"unsupported column type {text!r}")


def parse_schema(ddl: str) -> T.StructType:
    """'a string, b array<float>' -> StructType (all nullable: Delta keeps nullability loose)."""
    fields = []
    for part in re.split(r",(?![^<]*>)", ddl):
        part = part.strip()
        if not part:
            continue
        name, type_text = part.split(None, 1)
        fields.append(T.StructField(name, parse_type(type_text), nullable=True))
    return T.StructType(fields)


@dataclass(frozen=True)
class TableSpec:
    name: str
    ddl: str
    key: tuple[str, ...]
    written_by: str
    description: str

    @property
    def schema(self) -> T.StructType:
        return parse_schema(self.ddl)

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]


TABLES: dict[str, TableSpec] = {}


def _register(spec: TableSpec) -> TableSpec:
    TABLES[spec.name] = spec
    return spec


PRODUCTS = _register(TableSpec(
    "products",
    "product_id string, title string, description string, brand string, category string, "
    "attributes string, text string, content_hash string, source string, ingested_at timestamp",
    key=("product_id",),
    written_by="ingest",
    description="Bronze catalog: one row per product. `text` is the normalised title + attributes + description used by every model.",
))

QUERIES = _register(TableSpec(
    "queries",
    "query_id string, query string, frequency bigint, segment string, origin string, source string, ingested_at timestamp",
    key=("query_id",),
    written_by="ingest, channels (built query log)",
    description="Queries to mine for. `origin` is 'labelled' (human-judged set), 'log' (user traffic) or 'built' (query-log builder). `segment` is head/torso/tail by frequency.",
))

HUMAN_LABELS = _register(TableSpec(
    "human_labels",
    "query_id string, product_id string, grade int, variance double, source string, ingested_at timestamp",
    key=("query_id", "product_id"),
    written_by="ingest",
    description="Human relevance grades (calibration of the judge cascade and evaluation).",
))

QUARANTINE = _register(TableSpec(
    "quarantine",
    "target_table string, source string, record_key string, reason string, raw string, quarantined_at timestamp",
    key=("target_table", "source", "record_key", "reason"),
    written_by="ingest",
    description="Rows refused by a job, with the reason and the raw row as JSON. Nothing is dropped silently.",
))

RETRIEVAL_LOGS = _register(TableSpec(
    "retrieval_logs",
    "run_id string, query_id string, query string, channel string, product_id string, rank int, "
    "score double, logged_at timestamp, source string",
    key=("run_id", "query_id", "channel", "product_id"),
    written_by="channels, ingest (users' own logs)",
    description=f"Top-K results per query and channel ({', '.join(CHANNELS)}) with 1-based ranks.",
))

PRODUCT_EMBEDDINGS = _register(TableSpec(
    "product_embeddings",
    "product_id string, model string, content_hash string, embedding array<float>",
    key=("product_id", "model"),
    written_by="channels",
    description="Item embeddings of the ANN channel's encoder.",
))

MINED_CANDIDATES = _register(TableSpec(
    "mined_candidates",
    "query_id string, query string, product_id string, "
    + "".join(f"rank_{ch} int, score_{ch} double, " for ch in CHANNELS) +
    "n_channels int, best_rank int, worst_rank int, rank_spread int, token_similarity double, "
    "candidate_class string, level int, polarity string, segment string, mined_at timestamp",
    key=("query_id", "product_id"),
    written_by="mine",
    description="One row per mined (query, product) candidate with per-channel rank metadata, the set-logic class and its difficulty level 1-5.",
))

MINED_REPORT = _register(TableSpec(
    "mined_report",
    "dimension string, value string, candidate_class string, level int, n_candidates bigint, n_queries bigint, "
    "mined_at timestamp",
    key=("dimension", "value", "candidate_class"),
    written_by="mine",
    description="Mining report: candidates (and queries having one) per class, per channel that found them, per query segment.",
))

ANNOTATIONS = _register(TableSpec(
    "annotations",
    "query_id string, product_id string, judge_version string, grade int, confidence double, "
    "deciding_tier string, tier_outputs string, latency_ms double, prompt_tokens bigint, "
    "completion_tokens bigint, error string, annotated_at timestamp, attempts int, escalation string, "
    "content_hash string",
    key=("query_id", "product_id", "judge_version"),
    written_by="annotate",
    description="Graded relevance from the judge cascade. `error` is set (and grade null) when a tier the pair reached "
                "failed, naming the tier and why; `attempts` counts the annotate runs that tried the pair (a failed pair "
                "is retried while it is below `annotate.max_attempts`); `escalation` is null (settled by the first tier), "
                "'escalated' (the later tiers it needed were consulted), 'budget' (it needed an LLM tier but "
                "`annotate.llm_budget` was spent: it keeps the first tier's grade until a later run escalates it) or "
                "'batch' (`annotate.mode: batch`: its LLM request waits in a batch, `llm_batch_requests`; it keeps the "
                "first tier's grade until a later run collects the answer). "
                "`content_hash` is the SHA-256 of the query text and product text the grade was given for "
                "(annomine/graded_content.py): annotate grades a pair again, and curriculum ignores its grade, once "
                "that content changed.",
))

LLM_RESPONSES = _register(TableSpec(
    "llm_responses",
    "response_key string, settings_key string, model string, endpoint string, prompt_version string, "
    "answer string, prompt_tokens bigint, completion_tokens bigint, prompt_chars bigint, stored_at timestamp",
    key=("response_key",),
    written_by="annotate, judge (calibrate, eval)",
    description="Every answer an LLM tier got, stored once: `response_key` is the sha256 of everything that decides "
                "the answer (model, endpoint, prompt version, the full messages, decoding and log-probability "
                "settings; never the key), `settings_key` the same without the messages. `answer` is the parsed answer "
                "as JSON (grade, raw confidence and its source, grade distribution, reason); its tokens and the prompt's "
                "characters feed the cost forecast. Every LLM tier looks here "
                "before a request, so a re-run, a retrained tier 1 or a recalibration pays for no answer twice.",
))

LLM_LEDGER = _register(TableSpec(
    "llm_ledger",
    "run_id string, tier string, command string, judge_version string, model string, requests bigint, "
    "cache_hits bigint, prompt_tokens bigint, completion_tokens bigint, usd double, recorded_at timestamp",
    key=("run_id", "tier"),
    written_by="annotate, judge (calibrate, eval)",
    description="What each run spent per LLM tier: requests made, answers taken from `llm_responses` instead, the "
                "tokens the endpoint reported and their price from the tier's `input_usd_per_mtok` / "
                "`output_usd_per_mtok` (`usd` null for an unpriced hosted tier).",
))

LLM_BATCHES = _register(TableSpec(
    "llm_batches",
    "submission_id string, batch_id string, tier string, target string, state string, input_file string, "
    "input_file_id string, output_file_id string, error_file_id string, request_count bigint, created_at timestamp, "
    "updated_at timestamp",
    key=("submission_id",),
    written_by="annotate (annotate.mode: batch)",
    description="One row per batch of LLM requests (annomine/judges/batch.py): `target` 'openai' (uploaded and created "
                "through the Files and Batches API; `batch_id`, `input_file_id`, `output_file_id`, `error_file_id` are "
                "the endpoint's) or 'file' (JSONL written for `vllm run-batch`, collected from its output file); "
                "`input_file` is the request JSONL under the warehouse. `state`: 'submitting' (recorded before the upload; "
                "a run that finds it adopts the endpoint's batch carrying its `submission_id` in metadata, or submits "
                "the file again), 'written', the endpoint's status while it runs, then 'collected' (its answers are in "
                "`llm_responses`) or the endpoint's final 'failed' / 'expired' / 'cancelled'.",
))

LLM_BATCH_REQUESTS = _register(TableSpec(
    "llm_batch_requests",
    "custom_id string, submission_id string, tier string, settings_key string, state string, attempts int, "
    "error string, updated_at timestamp",
    key=("custom_id",),
    written_by="annotate (annotate.mode: batch)",
    description="One row per batched request: `custom_id` is the request's `response_key` in `llm_responses`, so an "
                "answer is stored once and a key waiting in a live batch is never submitted again. `state`: 'pending' "
                "(in batch `submission_id`), 'answered', 'failed' (its line failed, `error` says why: submitted again by "
                "the next run until it failed the tier's `max_attempts` times), 'gave_up' (the pair got the error; a "
                "later annotate retrying the pair starts again at 0). `attempts`: batches the request was sent in.",
))

# ---- curriculum (jobs/curriculum.py): one training-set table per model variant -------------------
TRAIN_SET_DDL = (
    "stage int, stage_name string, loss string, query_id string, query string, product_id string, item_text string, "
    "label int, grade int, candidate_class string, level int, neg_product_id string, neg_text string, neg_grade int, "
    "neg_class string, neg_level int, group_product_ids array<string>, group_texts array<string>, group_grades array<int>"
)
def train_set_table(variant: str) -> str:
    """The name of variant `variant`'s training-set table, registered on first use (variants are config data)."""
    name = f"train_set_{variant}"
    if name not in TABLES:
        _register(TableSpec(
            name,
            TRAIN_SET_DDL,
            key=("stage", "query_id", "product_id", "neg_product_id"),
            written_by="curriculum",
            description=f"Training rows of the '{variant}' model variant, per curriculum stage: pointwise (bce), "
                        "pairs with a negative (mnr, triplet) or graded lists (roar); also written as Parquet shards. "
                        "Only train-split queries (annomine.splits), never dev or test ones. Rows of a human-label "
                        "stage have candidate_class 'human_label' and no level.",
        ))
    return name


# The training sets the curated views read (sql/00_views.sql): the shipped configs' variants and the lab's.
TRAIN_SET_VARIANTS = ("curriculum", "mixed", "no_llm", "curriculum_roar", "human", "human_plus_curriculum",
                      "curriculum_then_human", "curriculum_with_human")
for _variant in TRAIN_SET_VARIANTS:
    train_set_table(_variant)
