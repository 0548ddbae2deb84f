"""Stage `annotate`: grade mined candidates with the judge cascade into the `annotations` Delta table.

Reads `mined_candidates` (query_id, product_id, query) and `products` (text), keeps the pairs not
yet annotated for this judge version, plus those whose earlier annotation failed (retried until
`max_attempts` runs have tried them), and grades them chunk by chunk through a pandas UDF
(`mapInPandas`, see spark_udfs/annotation.py). Each chunk is committed with a MERGE on
(query_id, product_id, judge_version) that only ever replaces a failed row, so a run killed midway
and started again loses nothing and duplicates nothing; re-running grades only what is missing or
failed. A pair on which a tier failed keeps a null grade and the error naming the tier; the run
stops with an error when a tier fails more than `max_tier_failure_share` of the pairs sent to it,
and at once, writing nothing more, when an endpoint refuses the key. One annotate runs per
warehouse at a time (annomine/locks.py). With `cascade.loopback.embedded` the job starts the
loopback OpenAI-compatible server itself (demo and tests); otherwise tiers 2-3 call the configured
endpoints with the key from the env var (or secret scope) named in the config.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field

import pandas as pd
from pyspark.sql import functions as F

from annomine.errors import AnnomineError
from annomine.judges.config import CascadeConfig
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
    # Pairs per committed chunk (one MERGE each): the most a killed run has to redo.
    chunk_size: int = 500
    # Partitions per chunk (at most cascade.max_concurrency_total); LLM concurrency per partition =
    # max_concurrency_total // partitions, so the job never has more requests open than the total.
    partitions: int = 2
    # Grade whole queries, in query_id order, up to this many pairs in all (at least one query; None: all).
    limit: int | None = None
    # Retry pairs whose earlier annotation failed (a tier failed, the product text was missing).
    retry_errors: bool = True
    # Annotate runs that may try one pair; a pair still failing after that keeps its error.
    max_attempts: int = 3
    # Stop with an error when a tier fails on more than this share of the pairs sent to it.
    max_tier_failure_share: float = 0.05
    # When another annotate holds this warehouse: wait this long for it, then stop naming it.
    lock_wait_s: float = 0.0

    def validate(self) -> None:
        if self.chunk_size < 1 or self.partitions < 1 or self.max_attempts < 1:
            raise ValueError("chunk_size, partitions and max_attempts must be >= 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must be >= 0")
        if not 0.0 <= self.max_tier_failure_share <= 1.0:
            raise ValueError("max_tier_failure_share must be in [0, 1]")
        if self.lock_wait_s < 0:
            raise ValueError("lock_wait_s must be >= 0")


CONFIG_CLASS = AnnotateConfig


def add_attempts_column(ctx: JobContext) -> None:
    """Give an `annotations` table written before the `attempts` column existed that column (1: tried once)."""
    if ctx.tables.exists("annotations") and "attempts" not in ctx.tables.read("annotations").columns:
        log.info("annotate: adding the attempts column to the annotations table (every row tried once)")
        ctx.tables.overwrite("annotations", ctx.tables.read("annotations").withColumn("attempts", F.lit(1).cast("int")))


def pairs_to_grade(ctx: JobContext, cfg: AnnotateConfig, judge_version: str):
    """(query_id, product_id, query, text, prior_attempts) of the source pairs this judge version has not
    annotated yet, or whose annotation failed in fewer than `max_attempts` runs (with `retry_errors`)."""
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
    pairs = pairs.join(products, "product_id", "left").select("query_id", "product_id", "query", "text")
    if not ctx.tables.exists("annotations"):
        return pairs.withColumn("prior_attempts", F.lit(0))
    done = (ctx.tables.read("annotations").filter(F.col("judge_version") == judge_version)
            .select(*KEY, F.col("error").alias("_error"), F.coalesce(F.col("attempts"), F.lit(1)).alias("prior_attempts")))
    retry = (F.col("_error").isNotNull() & (F.col("prior_attempts") < cfg.max_attempts)) if cfg.retry_errors else F.lit(False)
    pairs = pairs.join(done, KEY, "left").filter(F.col("prior_attempts").isNull() | retry)
    return pairs.select("query_id", "product_id", "query", "text",
                        F.coalesce(F.col("prior_attempts"), F.lit(0)).cast("int").alias("prior_attempts"))


def whole_queries(ctx: JobContext, pairs, limit: int):
    """The pairs of the first queries (query_id order) whose pairs add up to at most `limit`; at least one query."""
    counts = pairs.groupBy("query_id").count().orderBy("query_id").toPandas()
    n_queries = int((counts["count"].cumsum() <= limit).sum()) or (1 if limit > 0 else 0)
    chosen = counts["query_id"].astype(str).iloc[:n_queries]
    if chosen.empty:
        return pairs.limit(0)
    # Fix the selection once: the plan is re-evaluated per chunk, after earlier chunks committed.
    return pairs.join(ctx.spark.createDataFrame(pd.DataFrame({"query_id": chosen}), "query_id string"), "query_id", "left_semi")


def tier_counts(tier_outputs: pd.Series) -> dict[str, dict]:
    """Per tier: pairs sent to it, pairs it failed on, its first error and whether that error is fatal."""
    counts: dict[str, dict] = {}
    for text in tier_outputs:
        for name, out in json.loads(text or "{}").items():
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


def run(ctx: JobContext, cfg: AnnotateConfig) -> dict:
    from annomine.locks import warehouse_lock

    with warehouse_lock(ctx.project, "annotate", wait_s=cfg.lock_wait_s):
        return _run(ctx, cfg)


def _run(ctx: JobContext, cfg: AnnotateConfig) -> dict:
    from tqdm import tqdm

    from annomine.judges.cascade import Cascade
    from annomine.judges.store import resolve_judge
    from spark_udfs.annotation import EXTRA_FIELDS, make_annotator, output_schema

    project = ctx.project
    grades = list(range(project.min_grade, project.max_grade + 1))
    folder = resolve_judge(project.warehouse, cfg.cascade.judge) if cfg.cascade.tier1 else None
    partitions = min(cfg.partitions, cfg.cascade.max_concurrency_total)
    per_partition = cfg.cascade.max_concurrency_total // partitions
    started = time.time()
    stats = {"pairs": 0, "graded": 0, "errors": 0, "retried": 0, "chunks": 0, "llm_requests": 0, "by_tier": {}, "tiers": {}}
    add_attempts_column(ctx)
    with Cascade.open(cfg.cascade, folder, grades, project.warehouse, concurrency=per_partition) as cascade:
        version = cascade.version
        stats["judge_version"] = version
        pairs = pairs_to_grade(ctx, cfg, version)
        if cfg.limit is not None:
            pairs = whole_queries(ctx, pairs, cfg.limit)
        n = pairs.count()
        stats["missing"] = n
        log.info("annotate: %d pairs to grade with judge %s (tiers %s), %d per chunk", n, version, cascade.tier_names, cfg.chunk_size)
        if n == 0:
            ctx.tables.ensure("annotations")
        n_chunks = max(1, math.ceil(n / cfg.chunk_size))
        keyed = pairs.withColumn("_chunk", F.pmod(F.hash("query_id", "product_id"), F.lit(n_chunks)))
        annotator = make_annotator(cascade, version, per_partition)
        schema = output_schema()
        extra = [f.name for f in EXTRA_FIELDS]
        failure = None
        for c in tqdm(range(n_chunks if n else 0), desc="annotate", unit="chunk", mininterval=5):
            chunk = keyed.filter(F.col("_chunk") == c).drop("_chunk").repartition(partitions)
            # Materialise the graded chunk once (each pair is sent to the LLMs exactly once), then MERGE it.
            graded = chunk.mapInPandas(annotator, schema).toPandas()
            if graded.empty:
                continue
            chunk_tiers = tier_counts(graded["tier_outputs"])
            refused = refused_key(cascade, chunk_tiers)
            if refused is not None:
                raise refused
            rows = ctx.spark.createDataFrame(graded.drop(columns=extra), schema=ctx.tables.spec("annotations").schema)
            ctx.tables.merge("annotations", rows, update_if="t.error IS NOT NULL")  # only a failed row is replaced
            stats["llm_requests"] += int(graded["llm_requests"].fillna(0).sum())
            stats["chunks"] += 1
            stats["pairs"] += len(graded)
            stats["graded"] += int(graded["grade"].notna().sum())
            stats["errors"] += int(graded["error"].notna().sum())
            stats["retried"] += int((graded["attempts"] > 1).sum())
            for tier, count in graded["deciding_tier"].fillna("error").value_counts().items():
                stats["by_tier"][tier] = stats["by_tier"].get(tier, 0) + int(count)
            add_tier_counts(stats["tiers"], chunk_tiers)
            log.info("annotate: chunk %d/%d committed (%d pairs, %d failed)", c + 1, n_chunks, len(graded),
                     int(graded["error"].notna().sum()))
            failure = tier_failure(stats["tiers"], cfg.max_tier_failure_share, MIN_PAIRS_TO_STOP_EARLY)
            if failure:
                break
        if cascade.server is not None:
            stats["llm_server"] = cascade.server.stats
    elapsed = time.time() - started
    stats["seconds"] = round(elapsed, 2)
    stats["pairs_per_s"] = round(stats["pairs"] / elapsed, 2) if elapsed > 0 else None
    stats["llm_requests_per_pair"] = round(stats["llm_requests"] / stats["pairs"], 3) if stats["pairs"] else 0.0
    print(json.dumps(stats, indent=2))
    failure = failure or tier_failure(stats["tiers"], cfg.max_tier_failure_share, 1)
    if failure:
        raise TierFailureError(failure, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    for noisy in ("httpx2", "httpcore", "openai"):  # one line per LLM request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = job_parser("annomine annotate", __doc__)
    parser.add_argument("--limit", type=int, help="grade whole queries up to this many pairs")
    args = parser.parse_args(argv)
    project, cfg = load(args, "annotate", AnnotateConfig)
    if args.limit is not None:
        cfg.limit = args.limit
    ctx = open_context(project)
    run(ctx, cfg)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine annotate", main))
