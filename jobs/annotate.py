"""Stage `annotate`: grade mined candidates with the judge cascade into the `annotations` Delta table.

Reads `mined_candidates` (query_id, product_id, query) and `products` (text), keeps the pairs not
yet in `annotations` for this judge version (anti-join), and grades them chunk by chunk through a
pandas UDF (`mapInPandas`, see spark_udfs/annotation.py). Each chunk is committed with a MERGE
on (query_id, product_id, judge_version) that never overwrites, so a run killed midway and
started again loses nothing and duplicates nothing; re-running grades only what is missing.
With `cascade.llm_server: embedded` the job starts the loopback OpenAI-compatible server itself
(demo and tests); otherwise tiers 2-3 call the configured endpoints with the key from the env var
(or secret scope) named in the config.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field

from pyspark.sql import functions as F

from annomine.judges.config import CascadeConfig
from annomine.runtime import JobContext, job_parser, load, open_context, setup_logging

log = logging.getLogger("annomine.annotate")


@dataclass
class AnnotateConfig:
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    # Table of pairs to grade (needs query_id, product_id and query).
    source: str = "mined_candidates"
    # Pairs per committed chunk (one MERGE each): the most a killed run has to redo.
    chunk_size: int = 500
    # Partitions per chunk; LLM concurrency per partition = cascade.max_concurrency_total // partitions.
    partitions: int = 2
    # Grade at most this many missing pairs in this run (None: all).
    limit: int | None = None
    # Also re-grade pairs whose earlier annotation ended in an error.
    retry_errors: bool = False

    def validate(self) -> None:
        if self.chunk_size < 1 or self.partitions < 1:
            raise ValueError("chunk_size and partitions must be >= 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must be >= 0")


CONFIG_CLASS = AnnotateConfig


def pairs_to_grade(ctx: JobContext, cfg: AnnotateConfig, judge_version: str):
    """(query_id, product_id, query, text) of source pairs not yet annotated by this judge version."""
    src = ctx.tables.read(cfg.source)
    missing = [c for c in ("query_id", "product_id") if c not in src.columns]
    if missing:
        raise ValueError(f"table {cfg.source} has no column(s) {missing}")
    if "query" in src.columns:
        pairs = src.select("query_id", "product_id", "query")
    else:
        pairs = src.select("query_id", "product_id").join(ctx.tables.read("queries").select("query_id", "query"), "query_id", "left")
    pairs = pairs.dropDuplicates(["query_id", "product_id"])
    products = ctx.tables.read("products").select("product_id", "text")
    pairs = pairs.join(products, "product_id", "left").select("query_id", "product_id", "query", "text")
    if ctx.tables.exists("annotations"):
        done = ctx.tables.read("annotations").filter(F.col("judge_version") == judge_version)
        if cfg.retry_errors:
            done = done.filter(F.col("error").isNull())
        pairs = pairs.join(done.select("query_id", "product_id"), ["query_id", "product_id"], "left_anti")
    return pairs


def run(ctx: JobContext, cfg: AnnotateConfig) -> dict:
    from tqdm import tqdm

    from annomine.judges.cascade import Cascade
    from annomine.judges.store import resolve_judge
    from spark_udfs.annotation import EXTRA_FIELDS, make_annotator, output_schema

    project = ctx.project
    grades = list(range(project.min_grade, project.max_grade + 1))
    folder = resolve_judge(project.warehouse, cfg.cascade.judge) if cfg.cascade.tier1 else None
    per_partition = max(1, cfg.cascade.max_concurrency_total // cfg.partitions)
    started = time.time()
    stats = {"pairs": 0, "graded": 0, "errors": 0, "chunks": 0, "llm_requests": 0, "by_tier": {}}
    with Cascade.open(cfg.cascade, folder, grades, project.warehouse, concurrency=per_partition) as cascade:
        version = cascade.version
        stats["judge_version"] = version
        pairs = pairs_to_grade(ctx, cfg, version)
        if cfg.limit is not None:
            # Fix the selection once: the plan is re-evaluated per chunk, after earlier chunks committed.
            keys = pairs.select("query_id", "product_id").orderBy("query_id", "product_id").limit(cfg.limit).toPandas()
            chosen = ctx.spark.createDataFrame(keys.astype(str), "query_id string, product_id string") if len(keys) else None
            pairs = pairs.join(chosen, ["query_id", "product_id"], "left_semi") if chosen is not None else pairs.limit(0)
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
        for c in tqdm(range(n_chunks if n else 0), desc="annotate", unit="chunk", mininterval=5):
            chunk = keyed.filter(F.col("_chunk") == c).drop("_chunk").repartition(cfg.partitions)
            # Materialise the graded chunk once (each pair is sent to the LLMs exactly once), then MERGE it.
            graded = chunk.mapInPandas(annotator, schema).toPandas()
            if graded.empty:
                continue
            stats["llm_requests"] += int(graded["llm_requests"].fillna(0).sum())
            rows = ctx.spark.createDataFrame(graded.drop(columns=extra), schema=ctx.tables.spec("annotations").schema)
            ctx.tables.merge("annotations", rows, update=cfg.retry_errors)
            stats["chunks"] += 1
            stats["pairs"] += len(graded)
            stats["graded"] += int(graded["grade"].notna().sum())
            stats["errors"] += int(graded["error"].notna().sum())
            for tier, count in graded["deciding_tier"].fillna("error").value_counts().items():
                stats["by_tier"][tier] = stats["by_tier"].get(tier, 0) + int(count)
            log.info("annotate: chunk %d/%d committed (%d pairs)", c + 1, n_chunks, len(graded))
        if cascade.server is not None:
            stats["llm_server"] = cascade.server.stats
    elapsed = time.time() - started
    stats["seconds"] = round(elapsed, 2)
    stats["pairs_per_s"] = round(stats["pairs"] / elapsed, 2) if elapsed > 0 else None
    stats["llm_requests_per_pair"] = round(stats["llm_requests"] / stats["pairs"], 3) if stats["pairs"] else 0.0
    print(json.dumps(stats, indent=2))
    return stats


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    for noisy in ("httpx2", "httpcore", "openai"):  # one line per LLM request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = job_parser("annomine annotate", __doc__)
    parser.add_argument("--limit", type=int, help="grade at most this many missing pairs")
    args = parser.parse_args(argv)
    project, cfg = load(args, "annotate", AnnotateConfig)
    if args.limit is not None:
        cfg.limit = args.limit
    ctx = open_context(project)
    run(ctx, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
