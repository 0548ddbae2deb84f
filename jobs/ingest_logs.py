"""Users' own retrieval logs (CSV / TSV / Parquet / JSONL / Delta) into `retrieval_logs`.

Called by `annomine ingest` when the config has `ingest.retrieval_logs`, e.g.

    ingest:
      retrieval_logs: {path: /data/search_logs.parquet, columns: {query_id: qid, product_id: sku}}

Required columns: query_id, channel (lexical | bm25 | ann), product_id, rank (1-based); optional:
query, score (higher = better), logged_at, run_id (default: one id per source file). Bad rows go
to `quarantine` with the reason; re-ingesting the same file MERGEs onto the same keys.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pyspark.sql import functions as F

from annomine.log_validation import REQUIRED, validate_retrieval_logs
from annomine.runtime import JobContext
from annomine.sources import SourceConfig, read_raw, select_mapped


def default_run_id(source: SourceConfig) -> str:
    path = source.path if "://" in source.path else str(Path(source.path).expanduser().resolve())
    return "log-" + hashlib.sha256(path.encode("utf-8")).hexdigest()[:12]


def ingest_retrieval_logs(ctx: JobContext, source: SourceConfig) -> str:
    raw = read_raw(ctx.spark, source)
    mapped = select_mapped(raw, source, REQUIRED, ["query", "score", "logged_at", "run_id"])
    products = ctx.tables.read("products").select("product_id") if ctx.tables.exists("products") else None
    good, bad = validate_retrieval_logs(mapped, source.path, default_run_id(source), products)
    if ctx.tables.exists("queries"):  # fill missing query text from the queries table
        known = ctx.tables.read("queries").select("query_id", F.col("query").alias("_known_query"))
        good = (good.join(known, "query_id", "left")
                    .withColumn("query", F.coalesce("query", "_known_query")).drop("_known_query"))
    read_count = mapped.count()
    ctx.tables.merge("retrieval_logs", good)
    ctx.tables.merge("quarantine", bad)
    loaded = good.count()
    reasons = bad.groupBy("reason").count().orderBy(F.desc("count")).collect()
    n_bad = sum(r["count"] for r in reasons)
    line = f"retrieval_logs: {read_count} rows read, {loaded} loaded, {n_bad} quarantined"
    if read_count - loaded - n_bad:
        line += f", {read_count - loaded - n_bad} duplicate rows merged"
    if reasons:
        line += " (" + "; ".join(f"{r['reason']}: {r['count']}" for r in reasons[:8]) + ")"
    return line
