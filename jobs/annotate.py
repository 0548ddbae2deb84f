"""Stage `annotate`: grade mined candidates with the judge cascade into the `annotations` Delta table.

Reads `mined_candidates` (query_id, product_id, query) and `products` (text), keeps the pairs not
yet annotated for this judge version, those whose query or product text changed since they were
graded (`annotations.content_hash`; a table without that column is graded again), plus those whose
earlier annotation failed (retried until `max_attempts` runs have tried them), and grades them chunk
by chunk through a pandas UDF (`mapInPandas`, see spark_udfs/annotation.py); a chunk is at most `chunk_size`
pairs (annomine/chunks.py) and the driver collects one graded chunk at a time. Each chunk is committed
with a MERGE on (query_id, product_id, judge_version) that only ever replaces a failed row (or one
graded for other content), so a run killed midway and started again loses nothing and duplicates
nothing; re-running grades only what is missing, changed or failed. A pair on which a tier failed keeps a null grade and the error naming the tier; the run
stops with an error when a tier fails more than `max_tier_failure_share` of the pairs sent to it,
and at once, writing nothing more, when an endpoint refuses the key. One annotate runs per
warehouse at a time (annomine/locks.py). With `cascade.loopback.embedded` the job starts the
loopback OpenAI-compatible server itself (tests); a tier with `server: local` gets a llama.cpp server
the job starts and stops (annomine/judges/local_server.py); otherwise tiers 2-3 call the configured
endpoints with the key from the env var (or secret scope) named in the config.

When tier 1 comes first (and always under `llm_budget` or `max_cost`), escalation is a second pass: the
chunks are graded by tier 1, the pairs it is unsure of are stored with its grade and `escalation = 'budget'`,
the forecast of what escalating them costs is printed (annomine/judges/spending.py), and then the least
confident of those (lowest calibrated tier-1 confidence first, from this run and earlier ones) are escalated,
chunk by chunk, until a budget is spent; each is replaced by MERGE (a 'budget' row, like a failed one, may be
replaced). What is left keeps tier 1's grade and is escalated by a later run. An LLM tier answers from the
response cache (`llm_responses`) what it was asked before; each chunk's new answers are stored before its
grades, and the run's tokens and money go to `llm_ledger`. When `judge calibrate` kept no combination with an
LLM tier, nothing escalates (the LLM's grades would decide nothing; `escalate: always` overrides).
`--dry-run` prints the forecast and makes no request and writes no table (the forecast is kept in
`<warehouse>/runs/annotate_forecast_summary.json`).

With `mode: batch` the requests of the escalated pairs go to the endpoint's batch API instead (annomine/judges/batch.py):
the pairs keep tier 1's grade with `escalation = 'batch'` until a later run (or `--collect`, which grades no new pair)
collects the answers into `llm_responses` and grades them again from there; `--batch-results` collects the output
file of `vllm run-batch` for requests written with `batch.target: file`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field

import pandas as pd
from pyspark.sql import functions as F

from annomine.bounds import bounded
from annomine.errors import AnnomineError
from annomine.graded_content import content_hash
from annomine.judges import lines
from annomine.judges.config import BatchConfig, CascadeConfig
from annomine.run_summary import write_summary
from annomine.runtime import JobContext, job_parser, load, open_context, setup_logging

log = logging.getLogger("annomine.annotate")

KEY = ["query_id", "product_id"]
# A tier is judged on at least this many pairs before a run stops early for its failure share.
MIN_PAIRS_TO_STOP_EARLY = 20


class EndpointRefusedKey(AnnomineError):
    """An LLM endpoint answered 401/403: the key is wrong, expired or lacks access."""


class TierFailureError(AnnomineError):
    """A tier failed on more than `annotate.max_tier_failure_share` of its pairs; `stats` is the run summary."""

    def __init__(self, message: str, stats: dict):
        super().__init__(message)
        self.stats = stats


@dataclass
class AnnotateConfig:
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    # Table of pairs to grade (needs query_id, product_id and query).
    source: str = "mined_candidates"
    # Pairs per committed chunk (one MERGE each, annomine/chunks.py): the most a killed run has to redo, and the most
    # graded rows the driver collects at once. Each chunk also costs a fixed ~1.3 s (its selection, the UDF's
    # start, the MERGE) on 2 cores: 2,000 tier-1 pairs take ~20 s, so the fixed part stays near 6%.
    chunk_size: int = bounded(2000, ge=1)
    # Partitions per chunk (at most cascade.max_concurrency_total); LLM concurrency per partition =
    # max_concurrency_total // partitions, so the job never has more requests open than the total.
    partitions: int = bounded(2, ge=1)
    # Grade whole queries, in query_id order, up to this many pairs in all (at least one query; None: all).
    limit: int | None = bounded(None, ge=0)
    # Retry pairs whose earlier annotation failed (a tier failed, the product text was missing).
    retry_errors: bool = True
    # Annotate runs that may try one pair; a pair still failing after that keeps its error.
    max_attempts: int = bounded(3, ge=1)
    # Stop with an error when a tier fails on more than this share of the pairs sent to it.
    max_tier_failure_share: float = bounded(0.05, ge=0, le=1)
    # When another annotate holds this warehouse: wait this long for it, then stop naming it.
    lock_wait_s: float = bounded(0.0, ge=0)
    # LLM tier calls (pairs sent to tier 2 or 3; HTTP retries not counted) per run, spent on the pairs tier 1 is
    # least sure of; the rest keep tier 1's grade with escalation 'budget' for a later run. None: unlimited.
    llm_budget: int | None = bounded(None, ge=0)
    # `auto`: send no pair up to an LLM tier when `judge calibrate` fitted the combinations of these tiers and kept
    # none (the first tier decides every pair, so the calls would buy grades that decide nothing); unsure pairs are
    # stored with escalation 'budget'. `always`: escalate anyway, to record the LLM's grades.
    escalate: str = "auto"
    # USD per run (priced tiers: `input_usd_per_mtok` / `output_usd_per_mtok`), spent like `llm_budget`: tier 1 grades
    # every pair first, then the least sure pairs escalate while their estimated cost still fits. None: unlimited.
    max_cost: float | None = bounded(None, ge=0)
    # Log the run's summary numbers (LLM calls, response-cache hits and misses) to MLflow.
    log_mlflow: bool = True
    # `online`: LLM requests are sent one by one as pairs escalate. `batch`: they go to the endpoint's batch API
    # (annomine/judges/batch.py); their pairs keep tier 1's grade (escalation 'batch') until a later run collects them.
    mode: str = "online"
    # Batch mode: where the batches go and how they are collected.
    batch: BatchConfig = field(default_factory=BatchConfig)

    def validate(self) -> None:
        from annomine.judges.spending import check_escalate

        check_escalate(self.escalate)
        if self.mode not in ("online", "batch"):
            raise ValueError(f"mode must be 'online' or 'batch', got {self.mode!r}")
        if self.mode == "batch" and not (self.cascade.tier1 and (self.cascade.tier2 or self.cascade.tier3)):
            raise ValueError("mode: batch needs tier 1 and an LLM tier (cascade.tier1, cascade.tier2/3): a pair waits "
                             "for its batch answer with tier 1's grade")
        if self.mode == "batch" and self.max_cost is not None:
            raise ValueError("mode: batch takes llm_budget, not max_cost (batch answers are priced when collected)")
        if self.max_cost is not None:
            from annomine.judges.costs import price

            for name in ("tier2", "tier3"):
                tier = getattr(self.cascade, name)
                if tier is not None and price(tier) is None:
                    raise ValueError(f"max_cost needs a price for cascade.{name} ({tier.model}): set "
                                     f"cascade.{name}.input_usd_per_mtok and output_usd_per_mtok")


CONFIG_CLASS = AnnotateConfig


# Columns added to `annotations` after it was first written, with the value old rows get (SQL text: a classic
# driver cannot build a Column before its SparkContext exists, and spark-submit imports this module first).
ADDED_COLUMNS = {"attempts": "CAST(1 AS INT)", "escalation": "CAST(NULL AS STRING)", "content_hash": "CAST(NULL AS STRING)"}
# A row a later run may replace: a failed one, one whose escalation the budget deferred, or one graded for other content.
REPLACEABLE = ("t.error IS NOT NULL OR t.escalation IN ('budget', 'batch') "
               "OR NOT (t.content_hash <=> s.content_hash)")


def add_missing_columns(ctx: JobContext) -> None:
    """Give an `annotations` table written before a column existed that column (attempts 1: tried once; escalation
    null; content_hash null: what the grade was given for is unknown, so the pair is graded again)."""
    if not ctx.tables.exists("annotations"):
        return
    columns = ctx.tables.read("annotations").columns
    missing = [c for c in ADDED_COLUMNS if c not in columns]
    if missing:
        log.info("annotate: adding the column(s) %s to the annotations table", missing)
        if "content_hash" in missing:
            log.warning("annotate: the annotations table records no content hash: its grades count as stale "
                        "and every pair is graded again")
        df = ctx.tables.read("annotations")
        for c in missing:
            df = df.withColumn(c, F.expr(ADDED_COLUMNS[c]))
        ctx.tables.overwrite("annotations", df)


def source_pairs(ctx: JobContext, cfg: AnnotateConfig):
    """(query_id, product_id, query, text, content_hash) of every source pair (annomine/graded_content.py)."""
    src = ctx.tables.read(cfg.source)
    missing = [c for c in KEY if c not in src.columns]
    if missing:
        raise ValueError(f"table {cfg.source} has no column(s) {missing}")
    if "query" in src.columns:
        pairs = src.select("query_id", "product_id", "query")
    else:
        pairs = src.select(*KEY).join(ctx.tables.read("queries").select("query_id", "query"), "query_id", "left")
    pairs = pairs.dropDuplicates(KEY)
    products = ctx.tables.read("products").select("product_id", "text")
    return (pairs.join(products, "product_id", "left")
            .select("query_id", "product_id", "query", "text", content_hash(F.col("query"), F.col("text")).alias("content_hash")))


def pairs_to_grade(ctx: JobContext, cfg: AnnotateConfig, judge_version: str):
    """(query_id, product_id, query, text, content_hash, prior_attempts, content_changed) of the source pairs this
    judge version has not annotated yet, whose annotation was given for other content (a retitled product, an edited
    query: graded afresh), or whose annotation failed in fewer than `max_attempts` runs (with `retry_errors`)."""
    pairs = source_pairs(ctx, cfg)
    if not ctx.tables.exists("annotations"):
        return pairs.withColumn("prior_attempts", F.lit(0)).withColumn("content_changed", F.lit(False))
    done = (ctx.tables.read("annotations").filter(F.col("judge_version") == judge_version)
            .select(*KEY, F.col("error").alias("_error"), F.col("content_hash").alias("_graded_hash"),
                    F.coalesce(F.col("attempts"), F.lit(1)).alias("_attempts")))
    pairs = pairs.join(done, KEY, "left")
    changed = F.col("_attempts").isNotNull() & ~F.col("_graded_hash").eqNullSafe(F.col("content_hash"))
    retry = (F.col("_error").isNotNull() & (F.col("_attempts") < cfg.max_attempts)) if cfg.retry_errors else F.lit(False)
    pairs = pairs.withColumn("content_changed", changed).filter(F.col("_attempts").isNull() | changed | retry)
    prior = F.when(F.col("_attempts").isNull() | F.col("content_changed"), F.lit(0)).otherwise(F.col("_attempts"))
    return pairs.select("query_id", "product_id", "query", "text", "content_hash", prior.cast("int").alias("prior_attempts"),
                        "content_changed")


def with_text_vectors(ctx: JobContext, pairs, vector_key: str | None):
    """`pairs` with the cascade's `text_vector` column: each product's current `vector_key` vector from
    `product_embeddings` (null where it has none, and the text is encoded); `pairs` unchanged without a key or table."""
    from annomine.judges.cascade import TEXT_VECTOR
    from annomine.retrievers.embeddings import current_vectors

    vectors = current_vectors(ctx, vector_key) if vector_key else None
    if vectors is None:
        return pairs
    return pairs.join(vectors.withColumnRenamed("embedding", TEXT_VECTOR), "product_id", "left")


def deferred_pairs(ctx: JobContext, cfg: AnnotateConfig, judge_version: str, limit: int):
    """The `limit` pairs of this judge version whose escalation a budget deferred, least confident first, as
    (query_id, product_id, query, text, content_hash, prior_attempts); a budget escalation is not a new attempt."""
    if not ctx.tables.exists("annotations"):
        return None
    waiting = (ctx.tables.read("annotations")
               .filter((F.col("judge_version") == judge_version) & (F.col("escalation") == "budget") & F.col("error").isNull())
               .orderBy(F.col("confidence").asc_nulls_first(), "query_id", "product_id").limit(int(limit))
               .select(*KEY, "confidence", (F.coalesce(F.col("attempts"), F.lit(1)) - 1).cast("int").alias("prior_attempts"))
               .toPandas())
    if waiting.empty:
        return None
    keys = ctx.spark.createDataFrame(waiting[KEY + ["prior_attempts"]], "query_id string, product_id string, prior_attempts int")
    return source_pairs(ctx, cfg).join(keys, KEY, "inner")


def count_deferred(ctx: JobContext, judge_version: str, escalation: str = "budget") -> int:
    if not ctx.tables.exists("annotations"):
        return 0
    return int(ctx.tables.read("annotations").filter((F.col("judge_version") == judge_version)
                                                     & (F.col("escalation") == escalation)).count())


def waiting_pairs(ctx: JobContext, judge_version: str, pending: set[str]) -> pd.DataFrame:
    """(query_id, product_id, prior_attempts) of this judge version's pairs waiting for batch answers (escalation
    'batch') none of whose queued requests waits in a live batch: answered, failed, or never sent."""
    empty = pd.DataFrame({"query_id": [], "product_id": [], "prior_attempts": []})
    if not ctx.tables.exists("annotations"):
        return empty
    rows = (ctx.tables.read("annotations")
            .filter((F.col("judge_version") == judge_version) & (F.col("escalation") == "batch") & F.col("error").isNull())
            .select(*KEY, "tier_outputs", (F.coalesce(F.col("attempts"), F.lit(1)) - 1).cast("int").alias("prior_attempts"))
            .toPandas())
    ready = [not any(o.get("batch") == "queued" and o.get("response_key") in pending for o in json.loads(t or "{}").values())
             for t in rows["tier_outputs"]]
    return rows[ready][KEY + ["prior_attempts"]] if len(rows) else empty


def whole_queries(ctx: JobContext, pairs, source, limit: int):
    """The `pairs` of the first source queries (query_id order) whose source pairs add up to at most `limit`; at least
    one query. The selection counts every source pair, graded or not, so a resumed run grades what one uninterrupted
    run would have graded, not `limit` more."""
    counts = source.groupBy("query_id").count().orderBy("query_id").toPandas()
    n_queries = int((counts["count"].cumsum() <= limit).sum()) or (1 if limit > 0 else 0)
    chosen = counts["query_id"].astype(str).iloc[:n_queries]
    if chosen.empty:
        return pairs.limit(0)
    # Fix the selection once: the plan is re-evaluated per chunk, after earlier chunks committed.
    return pairs.join(ctx.spark.createDataFrame(pd.DataFrame({"query_id": chosen}), "query_id string"), "query_id", "left_semi")


def tier_counts(tier_outputs: pd.Series) -> dict[str, dict]:
    """Per tier: pairs sent to it, pairs it failed on, its first error and whether that error is fatal (a pair queued
    for a batch is counted when its answer is collected)."""
    counts: dict[str, dict] = {}
    for text in tier_outputs:
        for name, out in json.loads(text or "{}").items():
            if out.get("batch") == "queued":
                continue
            c = counts.setdefault(name, {"pairs": 0, "failed": 0, "first_error": None, "fatal": False})
            c["pairs"] += 1
            if out.get("grade") is None:
                c["failed"] += 1
                c["first_error"] = c["first_error"] or out.get("error")
                c["fatal"] = c["fatal"] or bool(out.get("fatal"))
    return counts


def add_tier_counts(total: dict, chunk: dict) -> None:
    for name, c in chunk.items():
        t = total.setdefault(name, {"pairs": 0, "failed": 0, "first_error": None})
        t["pairs"] += c["pairs"]
        t["failed"] += c["failed"]
        t["first_error"] = t["first_error"] or c["first_error"]


def tier_failure(tiers: dict, max_share: float, min_pairs: int) -> str | None:
    """The message for the first tier failing on more than `max_share` of at least `min_pairs` pairs."""
    for name, t in tiers.items():
        if t["pairs"] >= max(min_pairs, 1) and t["failed"] / t["pairs"] > max_share:
            return (f"annotate: {name} failed on {t['failed']} of {t['pairs']} pairs ({t['failed'] / t['pairs']:.0%}, more than "
                    f"annotate.max_tier_failure_share={max_share:g}); first error: {t['first_error']}. The failed pairs are "
                    f"stored with their error and retried by the next run")
    return None


def refused_key(cascade, chunk_tiers: dict) -> EndpointRefusedKey | None:
    for tier in cascade.tiers:
        c = chunk_tiers.get(tier.name)
        if c and c["fatal"]:
            secret = f"secret {tier.cfg.secret_scope}/{tier.cfg.secret_key}" if tier.cfg.secret_scope else "the key"
            where = tier.cfg.api_key_env or secret
            return EndpointRefusedKey(f"annotate: {tier.name} ({tier.cfg.model} at {tier.base_url}) refused the API key: "
                                      f"{c['first_error']}; check {where}. Nothing more was written")
    return None


def run(ctx: JobContext, cfg: AnnotateConfig, dry_run: bool = False, collect: bool = False,
        batch_results: str | None = None) -> dict:
    """Grade what is missing; with `dry_run`, only forecast what that would send to the LLM tiers and cost. Batch mode
    (`cfg.mode`): `collect` only finishes the pairs waiting for batches (no new pair is graded); `batch_results` is a
    `vllm run-batch` output file to collect."""
    from annomine.locks import warehouse_lock

    with warehouse_lock(ctx.project, "annotate", wait_s=cfg.lock_wait_s):
        return _run(ctx, cfg, dry_run, collect, batch_results)


class _Run:
    """One annotate run's chunk loop: grade a chunk in the pandas UDF, MERGE it, keep the summary."""

    def __init__(self, ctx: JobContext, cfg: AnnotateConfig, cascade, version: str, partitions: int, per_partition: int):
        from annomine.judges.costs import usage_by_tier
        from annomine.judges.spending import skip_reason
        from spark_udfs.annotation import EXTRA_FIELDS, output_schema

        self.ctx, self.cfg, self.cascade, self.version = ctx, cfg, cascade, version
        self.partitions, self.per_partition = partitions, per_partition
        self.schema = output_schema()
        self.extra = [f.name for f in EXTRA_FIELDS]
        self.llm_names = cascade.llm_tier_names
        self.stats = {"pairs": 0, "graded": 0, "errors": 0, "retried": 0, "chunks": 0, "max_chunk_rows": 0, "llm_requests": 0,
                      "by_tier": {},
                      "tiers": {}, "escalation": {"llm_budget": cfg.llm_budget, "llm_calls": 0,
                                                  "llm_calls_per_tier": {n: 0 for n in self.llm_names},
                                                  "escalated_pairs": 0, "deferred_by_budget": 0},
                      "llm_cache": {"loaded": 0, "stored": 0}}
        self.usage = usage_by_tier([], self.llm_names)  # per LLM tier: cache hits, requests, tokens
        # last outcome per pair in this run (a deferred pair is decided again when it escalates):
        # (deciding tier, graded, failed, retried)
        self.decided: dict[tuple, tuple] = {}
        self.failure = None
        self.history = None  # tokens per request of each LLM tier, for max_cost (costs.history)
        self.batch = None  # annotate.mode: batch (annomine/judges/batch.py)
        skipped = skip_reason(cascade, cfg.escalate)
        self.escalating = bool(self.llm_names) and skipped is None
        # tier 1 first: it grades every pair before any request, so the forecast can be printed first
        self.tier1_first = bool(cascade.tiers) and not hasattr(cascade.tiers[0], "cfg")
        if skipped:
            self.stats["escalation"]["skipped"] = skipped
            log.info("annotate: no escalation: %s", skipped)
        self.vector_key = cascade.text_vector_key
        if self.vector_key:
            log.info("annotate: tier 1's bi-encoder takes the products' %s vectors from product_embeddings where they "
                     "are current", self.vector_key)

    def grade(self, chunk, llm_budget: int | None, partitions: int, concurrency: int) -> dict | None:
        """Grade and commit one chunk; its per-tier counts (None when it was empty)."""
        from annomine.judges.costs import add_usage, usage_by_tier
        from annomine.judges.response_cache import new_answers_from_outputs, store_answers
        from spark_udfs.annotation import make_annotator

        annotator = make_annotator(self.cascade, self.version, concurrency, llm_budget)
        chunk = with_text_vectors(self.ctx, chunk, self.vector_key)
        graded = chunk.repartition(partitions).mapInPandas(annotator, self.schema).toPandas()
        if graded.empty:
            return None
        self.stats["max_chunk_rows"] = max(self.stats["max_chunk_rows"], len(graded))  # the most the driver held
        chunk_tiers = tier_counts(graded["tier_outputs"])
        refused = refused_key(self.cascade, chunk_tiers)
        if refused is not None:
            raise refused
        if self.batch is not None:  # the requests queued for a batch, read before the chunk's rows change
            self.batch.note(graded, chunk)
        # the answers paid for are stored before the grades: a run killed between the two pays for none again
        cache = self.stats["llm_cache"]
        cache["stored"] += store_answers(self.ctx.tables, new_answers_from_outputs(graded["tier_outputs"], self.cascade.tiers),
                                         self.cascade.tiers)
        chunk_cache = usage_by_tier(graded["tier_outputs"], self.llm_names)
        add_usage(self.usage, chunk_cache)
        rows = self.ctx.spark.createDataFrame(graded.drop(columns=self.extra), schema=self.ctx.tables.spec("annotations").schema)
        self.ctx.tables.merge("annotations", rows, update_if=REPLACEABLE)  # only a failed or deferred row is replaced
        st = self.stats
        st["llm_requests"] += int(graded["llm_requests"].fillna(0).sum())
        st["chunks"] += 1
        esc = st["escalation"]
        esc["llm_calls"] += int(graded["llm_calls"].fillna(0).sum())
        for name in self.llm_names:
            esc["llm_calls_per_tier"][name] += chunk_cache[name]["misses"]
        for q, p, d, g, e, a in zip(graded["query_id"], graded["product_id"], graded["deciding_tier"].fillna("error"),
                                    graded["grade"].notna(), graded["error"].notna(), graded["attempts"] > 1):
            self.decided[(q, p)] = (d, bool(g), bool(e), bool(a))
        esc["escalated_pairs"] += int((graded["escalation"] == "escalated").sum())
        add_tier_counts(st["tiers"], chunk_tiers)
        log.info("annotate: chunk committed (%d pairs, %d failed, %d LLM calls)", len(graded),
                 int(graded["error"].notna().sum()), int(graded["llm_calls"].fillna(0).sum()))
        self.failure = tier_failure(st["tiers"], self.cfg.max_tier_failure_share, MIN_PAIRS_TO_STOP_EARLY)
        return {"llm_calls": int(graded["llm_calls"].fillna(0).sum()), "pairs": len(graded),
                "still_deferred": int((graded["escalation"] == "budget").sum())}

    def first_pass(self, pairs, n: int) -> None:
        """Every pair to grade, chunk by chunk; with a budget, tier 1 only (unsure pairs deferred)."""
        from annomine.chunks import chunks
        from annomine.progress import progress

        budget = 0 if self.budgeted or not self.escalating else None
        with progress(n, desc="annotate", unit="pair") as bar:  # a bar on a terminal, else a line with the rate
            for chunk in (chunks(pairs, KEY, self.cfg.chunk_size) if n else []):
                # Materialise the graded chunk once (each pair is sent to the LLMs exactly once), then MERGE it.
                done = self.grade(chunk, budget, self.partitions, self.per_partition)
                bar.update(done["pairs"] if done else 0)
                if self.failure:
                    return

    @property
    def budgeted(self) -> bool:
        """Whether escalation is a second pass (after tier 1 graded every pair): under a budget, and whenever tier 1
        comes first, so the forecast is printed before the first request."""
        return self.cfg.llm_budget is not None or self.cfg.max_cost is not None or self.tier1_first

    def announce(self, pairs, first_tier_done: bool) -> None:
        """Print the forecast of `pairs` (None: the deferred ones) and start a local model server only if it will
        be asked."""
        from annomine.judges.costs import history
        from annomine.judges.forecast import forecast, tier_shares
        from annomine.judges.spending import announce, needs_requests

        if not self.escalating:
            return
        if pairs is None:
            pairs = deferred_pairs(self.ctx, self.cfg, self.version, 2**31 - 1)
        pdf = pairs.select("query", "text").toPandas() if pairs is not None else pd.DataFrame({"query": [], "text": []})
        fc = forecast(self.cascade, pdf, history(self.ctx.tables, self.cascade.tiers),
                      tier_shares(self.ctx.tables, self.llm_names), True, self.cfg.llm_budget, self.cfg.max_cost,
                      first_tier_done)
        self.stats["forecast"] = fc
        announce("annotate", fc)
        if needs_requests(fc):
            self.cascade.start_local_servers()

    def spent_usd(self) -> float:
        from annomine.judges.costs import spend

        return spend(self.usage, self.cascade.tiers)["usd"] or 0.0

    def affordable(self, chunk) -> int:
        """How many of the chunk's pairs fit in what is left of `max_cost`, each at the most it can cost."""
        from annomine.judges.costs import history, pair_cost_usd

        if self.cfg.max_cost is None:
            return self.cfg.chunk_size
        if self.history is None:
            self.history = history(self.ctx.tables, self.cascade.tiers)
        pdf = chunk.select("query", "text").toPandas()
        worst = max((pair_cost_usd(self.cascade.tiers, self.history, q, t) for q, t in zip(pdf["query"], pdf["text"])),
                    default=0.0)
        left = self.cfg.max_cost - self.spent_usd()
        return len(pdf) if worst <= 0 else max(0, min(len(pdf), int(left // worst)))

    def passes(self, pairs, n: int) -> None:
        """Grade the pairs, then escalate the deferred ones; the forecast comes before the first LLM request."""
        if not self.tier1_first:
            self.announce(pairs, first_tier_done=False)
        self.first_pass(pairs, n)
        if self.tier1_first and not self.failure:
            self.announce(None, first_tier_done=True)
        if self.batch is not None and self.escalating and not self.failure:
            self.regrade_waiting()
        self.escalate_deferred()
        if self.batch is not None and not self.failure:
            self.batch.submit()

    def regrade_waiting(self) -> None:
        """Batch mode: grade again the pairs waiting for batch answers that are no longer in a live batch: answered
        ones are decided from the response cache, failed or unsent ones are queued again."""
        ready = waiting_pairs(self.ctx, self.version, self.batch.pending)
        self.stats["batch"]["regraded"] = len(ready)
        size = self.cfg.chunk_size
        for start in range(0, len(ready), size):
            part = ready.iloc[start:start + size]
            keys = self.ctx.spark.createDataFrame(part, "query_id string, product_id string, prior_attempts int")
            self.grade(source_pairs(self.ctx, self.cfg).join(keys, KEY, "inner"), None, self.partitions, self.per_partition)
            if self.failure:
                return

    def escalate_deferred(self) -> None:
        """Spend the budgets on the deferred pairs, least confident first (unlimited without a budget)."""
        if not self.escalating:
            return
        remaining = self.cfg.llm_budget
        while (remaining is None or remaining > 0) and not self.failure:
            take = self.cfg.chunk_size if remaining is None else min(self.cfg.chunk_size, remaining)
            chunk = deferred_pairs(self.ctx, self.cfg, self.version, take)
            if chunk is None:
                return
            fits = self.affordable(chunk)
            if fits == 0:
                self.stats["escalation"]["stopped_by"] = "max_cost"
                return
            if fits < take:  # the least sure pairs whose cost still fits
                take = fits
                chunk = deferred_pairs(self.ctx, self.cfg, self.version, take)
            if remaining is None and self.cfg.max_cost is None:
                done = self.grade(chunk, None, self.partitions, self.per_partition)
            else:  # one partition: the chunk's budget holds across it
                done = self.grade(chunk, remaining, 1, self.cascade.concurrency * self.partitions)
            if done is None or (done["llm_calls"] == 0 and done["still_deferred"] == done["pairs"]):
                return
            if remaining is not None:
                remaining -= done["llm_calls"]


def forecast_run(ctx: JobContext, cfg: AnnotateConfig, cascade, job: _Run, pairs) -> dict:
    """The dry run: the pairs to grade and those deferred by earlier budgets, forecast without a request."""
    from annomine.judges.costs import history
    from annomine.judges.forecast import forecast, tier_shares

    pdf = pairs.select("query", "text").toPandas()
    waiting = deferred_pairs(ctx, cfg, job.version, 2**31 - 1) if job.escalating else None
    if waiting is not None:
        pdf = pd.concat([pdf, waiting.select("query", "text").toPandas()], ignore_index=True)
    fc = forecast(cascade, pdf, history(ctx.tables, cascade.tiers), tier_shares(ctx.tables, cascade.llm_tier_names),
                  job.escalating, cfg.llm_budget, cfg.max_cost)
    out = {"dry_run": True, "judge_version": job.version, "forecast": fc}
    path = write_summary(ctx.project, "annotate_forecast", out)
    print(f"annotate --dry-run: {len(pdf):,} pairs forecast, nothing graded or written (forecast: {path})", flush=True)
    return out


def _tally_outcomes(stats: dict, outcomes: list) -> None:
    """Put the pairs decided, graded, failed and retried, and the pairs settled per tier, in the summary."""
    stats["pairs"] = len(outcomes)
    stats["graded"] = sum(o[1] for o in outcomes)
    stats["errors"] = sum(o[2] for o in outcomes)
    stats["retried"] = sum(o[3] for o in outcomes)
    for tier, count in pd.Series([o[0] for o in outcomes], dtype=object).value_counts().items():
        stats["by_tier"][tier] = int(count)


def start_batch(ctx: JobContext, cfg: AnnotateConfig, job: _Run, results: str | None) -> None:
    """Batch mode: finish the earlier runs' batches (recover, collect) and put the LLM tiers in batch mode."""
    from annomine.judges.batch import BatchRun

    if cfg.mode != "batch" or not job.escalating:
        return
    job.batch = BatchRun(ctx.tables, cfg.batch, job.cascade.tiers, ctx.project.warehouse_path / "llm_batches")
    job.stats["batch"] = job.batch.stats
    job.batch.start(results or cfg.batch.results)


def _run(ctx: JobContext, cfg: AnnotateConfig, dry_run: bool = False, collect: bool = False,
         batch_results: str | None = None) -> dict:
    from annomine.judges.cascade import Cascade
    from annomine.judges.store import resolve_judge

    project = ctx.project
    grades = list(range(project.min_grade, project.max_grade + 1))
    folder = resolve_judge(project.warehouse_path, cfg.cascade.judge) if cfg.cascade.tier1 else None
    partitions = min(cfg.partitions, cfg.cascade.max_concurrency_total)
    per_partition = cfg.cascade.max_concurrency_total // partitions
    started = time.time()
    add_missing_columns(ctx)
    with Cascade.open(cfg.cascade, folder, grades, project.warehouse_path, concurrency=per_partition,
                      start_local=False) as cascade:
        version = cascade.version
        pairs = pairs_to_grade(ctx, cfg, version)
        if cfg.limit is not None:
            pairs = whole_queries(ctx, pairs, source_pairs(ctx, cfg), cfg.limit)
        n = pairs.count()
        job = _Run(ctx, cfg, cascade, version, partitions, per_partition)
        stats = job.stats
        if job.escalating:
            from annomine.judges.response_cache import load_answers

            stats["llm_cache"]["loaded"] = load_answers(ctx.tables, cascade.tiers)
        if dry_run:
            return forecast_run(ctx, cfg, cascade, job, pairs)
        start_batch(ctx, cfg, job, batch_results)
        if collect:
            pairs, n = pairs.limit(0), 0
        stats["judge_version"] = version
        stats["missing"] = n
        stats["content_changed"] = pairs.filter(F.col("content_changed")).count() if n else 0
        if stats["content_changed"]:
            log.info("annotate: %d pairs are graded again: their query or product text changed since their grade",
                     stats["content_changed"])
        log.info("annotate: %d pairs to grade with judge %s (tiers %s), %d per chunk, LLM budget %s", n, version,
                 cascade.tier_names, cfg.chunk_size, "unlimited" if cfg.llm_budget is None else cfg.llm_budget)
        ctx.tables.ensure("annotations")
        job.passes(pairs, n)
        summarise(ctx, cfg, job)
        failure = job.failure
    elapsed = time.time() - started
    stats["seconds"] = round(elapsed, 2)
    stats["pairs_per_s"] = round(stats["pairs"] / elapsed, 2) if elapsed > 0 else None
    stats["llm_requests_per_pair"] = round(stats["llm_requests"] / stats["pairs"], 3) if stats["pairs"] else 0.0
    if cfg.log_mlflow:
        track(ctx, stats)
    path = write_summary(ctx.project, "annotate", stats)
    print("\n".join([lines.annotate_line(stats), *lines.tier_usage_lines(stats.get("cost"))])
          + f"\nannotate: summary {path}", flush=True)
    failure = failure or tier_failure(stats["tiers"], cfg.max_tier_failure_share, 1)
    if failure:
        raise TierFailureError(failure, stats)
    return stats


def summarise(ctx: JobContext, cfg: AnnotateConfig, job: _Run) -> None:
    """The run's summary after its passes: deferred and waiting pairs, spend (and its ledger rows), outcomes."""
    stats, cascade, version = job.stats, job.cascade, job.version
    stats["escalation"]["deferred_by_budget"] = count_deferred(ctx, version)
    stats["escalation"]["max_cost"] = cfg.max_cost
    if job.batch is not None:
        from annomine.judges.costs import add_usage

        stats["escalation"]["waiting_for_batch"] = count_deferred(ctx, version, "batch")
        add_usage(job.usage, job.batch.usage)
    record_spend(ctx, stats, job.usage, cascade, batch=job.batch is not None)
    stats["escalation"]["combiner"] = cascade.kept_combinations
    stats["escalation"]["escalated_pairs_decided_by"] = cascade.escalated_pairs_decided_by
    _tally_outcomes(stats, list(job.decided.values()))
    if cascade.server is not None:
        stats["llm_server"] = cascade.server.stats


def record_spend(ctx: JobContext, stats: dict, usage: dict, cascade, batch: bool = False) -> None:
    """Cache hits and misses, tokens and money per tier in the summary (batch answers at the batch price), and one
    `llm_ledger` row per tier."""
    import uuid

    from annomine.judges.costs import spend, write_ledger

    stats["llm_cache"]["per_tier"] = {n: {"hits": u["hits"], "misses": u["misses"]} for n, u in usage.items()}
    stats["cost"] = spend(usage, cascade.tiers, batch=batch)
    stats["run_id"] = uuid.uuid4().hex
    write_ledger(ctx.tables, stats["run_id"], "annotate", stats["judge_version"], stats["cost"])


def track(ctx: JobContext, stats: dict) -> None:
    """The run's numbers in MLflow: pairs, LLM calls and requests, response-cache hits and misses per tier."""
    from annomine.tracking import Tracker

    metrics = {k: stats[k] for k in ("pairs", "graded", "errors", "llm_requests", "seconds")}
    metrics["llm_calls"] = stats["escalation"]["llm_calls"]
    for name, c in stats["cost"]["per_tier"].items():
        metrics[f"llm_cache_hits.{name}"], metrics[f"llm_requests.{name}"] = c["cache_hits"], c["requests"]
        metrics[f"prompt_tokens.{name}"], metrics[f"completion_tokens.{name}"] = c["prompt_tokens"], c["completion_tokens"]
        if c["usd"] is not None:
            metrics[f"usd.{name}"] = c["usd"]
    if stats["cost"]["usd"] is not None:
        metrics["usd"] = stats["cost"]["usd"]
    with Tracker(ctx.project).run("annotate", {"judge_version": stats["judge_version"]}) as tracked:
        tracked.metrics(metrics)
    stats["mlflow_run_id"] = tracked.run_id


def outcome(stats: dict) -> str:
    """The pipeline's one-line account of a run."""
    return (f"{stats.get('pairs', 0):,} pairs graded, {(stats.get('escalation') or {}).get('llm_calls', 0)} LLM calls, "
            f"{stats.get('errors', 0)} failed")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    for noisy in ("httpx2", "httpcore", "openai"):  # one line per LLM request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = job_parser("annomine annotate", __doc__)
    parser.add_argument("--limit", type=int, help="grade whole queries up to this many pairs")
    parser.add_argument("--dry-run", action="store_true",
                        help="forecast the pairs to escalate, requests, tokens and money per LLM tier; no request, no write")
    parser.add_argument("--collect", action="store_true",
                        help="batch mode: collect finished batches and grade only the pairs waiting for them")
    parser.add_argument("--batch-results", metavar="PATH",
                        help="batch mode: a `vllm run-batch` output JSONL answering the requests written with batch.target: file")
    args = parser.parse_args(argv)
    project, cfg = load(args, "annotate", AnnotateConfig)
    if args.limit is not None:
        cfg.limit = args.limit
    if (args.collect or args.batch_results) and cfg.mode != "batch":
        parser.error("--collect and --batch-results need annotate.mode: batch")
    ctx = open_context(project)
    run(ctx, cfg, dry_run=args.dry_run, collect=args.collect, batch_results=args.batch_results)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine annotate", main))
