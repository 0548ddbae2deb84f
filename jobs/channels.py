"""Stage `channels`: run the lexical, BM25 and ANN retrieval channels into `retrieval_logs`.

1. Optionally builds a query log from the catalog (`n_built_queries`, origin 'built') into `queries`.
2. For each channel of `channels` (looked up in the channel registry, `annomine.retrievers.registry`),
   builds its index once on the driver, ships it to Spark workers and retrieves the top-K per query
   in batched `mapInPandas`; results are appended to `retrieval_logs` under a run id derived from
   the channel configuration. (The ANN channel first encodes the catalog with MiniLM into
   `product_embeddings`, cached by content hash: a re-run only encodes new or changed products.)
3. Prints and saves the channel overlap report (CSV/JSON/PNG, also logged to MLflow).

Re-runs resume: a (query, channel) already logged for this run id, catalog and query text is skipped;
when the catalog changed, the channel's rows of the run are replaced (DELETE + append), and when a
query's text changed, that query's rows are, so keys never duplicate. (A SQL MERGE of ~600k rows
takes ~1 minute on Sail; DELETE + append a second.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import functions as F

from annomine.bounds import bounded
from annomine.ingestion import assign_segments
from annomine.overlap import format_summary, overlap_per_query, save_report, summarise
from annomine.query_log import build_query_log
from annomine.retrievers import registry
from annomine.retrievers.registry import ChannelInputs
from annomine.tracking import Tracker
from annomine.runtime import JobContext, run_job
from annomine.vocabulary import CHANNELS
from spark_udfs.retrieval import OUTPUT_SCHEMA, search_batches, ship

log = logging.getLogger("annomine.channels")

BUILT_SOURCE = "annomine channels: query-log builder"
RETRIEVER_VERSION = "1"  # bump when a retriever's ranking logic changes: a new run id


@dataclass
class ChannelsConfig:
    # Channels to run: names of the channel registry (default: the built-ins, vocabulary.CHANNELS).
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    top_k: int = bounded(500, ge=1)
    # Queries to run, by origin (labelled, log, built).
    origins: list[str] = field(default_factory=lambda: ["labelled", "log", "built"])
    # Query-log builder: how many queries to sample from the catalog (0: none).
    n_built_queries: int = bounded(0, ge=0)
    built_seed: int = 13
    # ANN channel.
    encoder: str = "minilm"
    max_length: int = bounded(64, ge=8)
    encode_batch_size: int = bounded(128, ge=1)
    embed_chunk: int = bounded(4096, ge=1)
    ann_index: str = "flat"
    # BM25 channel.
    bm25_k1: float = bounded(1.5, ge=0)
    bm25_b: float = bounded(0.75, ge=0, le=1)
    # Per-channel settings by channel name: fields of the channel's config dataclass (overrides the keys above).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Spark: number of query partitions for mapInPandas (0: the engine's default).
    query_partitions: int = bounded(0, ge=0)
    # Recompute every (query, channel) of the run even when already logged.
    refresh: bool = False
    # Overlap report over each channel's top-report_k; folder default <warehouse>/reports.
    report_k: int = bounded(100, ge=1)
    report_dir: str | None = None
    mlflow: bool = True

    def validate(self) -> None:
        known = registry.names()
        bad = [c for c in self.channels if c not in known]
        if bad or not self.channels:
            raise ValueError(f"channels must be a non-empty subset of {list(known)}, got {self.channels}")
        bad = [c for c in self.options if c not in known]
        if bad:
            raise ValueError(f"options: unknown channel(s) {bad}; channels are {list(known)}")
        bad = [o for o in self.origins if o not in ("labelled", "log", "built")]
        if bad:
            raise ValueError(f"origins must be among labelled, log, built; got {bad}")
        for name in known:
            self.channel_config(name)

    def channel_config(self, channel: str):
        """The channel's config dataclass, from its keys above and `options[channel]`."""
        return registry.get(channel).make_config(self, self.options.get(channel))

    @property
    def model_key(self) -> str:
        return f"{self.encoder}@{self.max_length}"

    def run_id(self) -> str:
        """Deterministic per retrieval configuration of every registered channel (not per channel list or query set)."""
        spec: dict = {"v": RETRIEVER_VERSION, "top_k": self.top_k}
        for name in registry.names():
            spec.update(registry.get(name).key(self.channel_config(name)))
        return "ch-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


CONFIG_CLASS = ChannelsConfig


def catalog_fingerprint(products: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for pid, chash in sorted(zip(products["product_id"], products["content_hash"].fillna(""))):
        h.update(f"{pid}\t{chash}\n".encode())
    return h.hexdigest()[:12]


# ---- query log ---------------------------------------------------------------------------------
def write_built_queries(ctx: JobContext, products: pd.DataFrame, cfg: ChannelsConfig) -> pd.DataFrame:
    """Build the query log, MERGE it into `queries` and re-segment every query with a frequency."""
    built = build_query_log(products, cfg.n_built_queries, seed=cfg.built_seed)
    if built.empty:
        return built
    spark = ctx.spark
    new = spark.createDataFrame(built[["query_id", "query", "frequency"]]).select(
        "query_id", "query", F.col("frequency").cast("bigint"), F.lit(None).cast("string").alias("segment"),
        F.lit("built").alias("origin"), F.lit(BUILT_SOURCE).alias("source"), F.current_timestamp().alias("ingested_at"))
    if ctx.tables.exists("queries"):
        existing = ctx.tables.read("queries")
        existing = existing.join(new.select("query_id"), "query_id", "left_anti").select(*new.columns)
        everything = existing.unionByName(new)
    else:
        everything = new
    with_freq = everything.where(F.col("frequency").isNotNull())
    segmented = assign_segments(with_freq, ctx.project.segments).select(*new.columns)
    ctx.tables.merge("queries", segmented)
    counts = dict(_value_counts(built["kind"]))
    if len(built) < cfg.n_built_queries:
        print(f"query log: the catalog yields only {len(built)} distinct queries of the {cfg.n_built_queries} requested")
    print(f"query log: {len(built)} built queries ({', '.join(f'{k} {v}' for k, v in counts.items())}) merged into queries")
    return built


def _value_counts(values) -> list[tuple[str, int]]:
    return sorted(pd.Series(values).value_counts().to_dict().items(), key=lambda kv: -kv[1])


# ---- retrievers ------------------------------------------------------------------------------------
def build_retriever(channel: str, ctx: JobContext, products: pd.DataFrame, cfg: ChannelsConfig, stats: dict):
    """The registered channel's retriever over the catalog (`annomine.retrievers.registry`)."""
    spec = registry.get(channel)
    return spec.build(ChannelInputs(products, ctx, stats), cfg.channel_config(channel))


def append_logs(ctx: JobContext, df) -> None:
    """Append rows (already unique on the key by construction) to retrieval_logs."""
    ctx.tables.append("retrieval_logs", df)


def _sql_strings(values) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def delete_run_rows(ctx: JobContext, run_id: str, channel: str, query_ids=None) -> None:
    """Delete the run's rows of `channel` (of `query_ids` only, when given)."""
    condition = f"run_id = '{run_id}' AND channel = '{channel}'"
    if query_ids is not None:
        condition += f" AND query_id IN ({_sql_strings(query_ids)})"
    ctx.tables.delete_where("retrieval_logs", condition)


def retexted_queries(done: pd.DataFrame, queries: pd.DataFrame) -> list[str]:
    """The logged queries (`done`: query_id, query) whose text in `queries` is no longer the logged one."""
    current = dict(zip(queries["query_id"], queries["query"]))
    logged = done[done["query_id"].isin(current.keys())]
    return sorted({q for q, text in zip(logged["query_id"], logged["query"]) if text != current[q]})


def pending_queries(ctx: JobContext, queries: pd.DataFrame, run_id: str, channel: str, source: str, refresh: bool) -> pd.DataFrame:
    """Queries still to retrieve for this channel; clears the run's rows when they are stale: all of them when
    the catalog changed, a query's own when its text changed since it was logged."""
    if not ctx.tables.exists("retrieval_logs"):
        return queries
    done = (ctx.tables.read("retrieval_logs").where((F.col("run_id") == run_id) & (F.col("channel") == channel))
            .groupBy("query_id", "query", "source").count().toPandas())
    if done.empty:
        return queries
    stale = (done["source"] != source).any()
    if refresh or stale:
        why = "refresh requested" if refresh else "the catalog changed since they were logged"
        print(f"{channel}: replacing the run's {int(done['count'].sum())} rows ({why})")
        delete_run_rows(ctx, run_id, channel)
        return queries
    retexted = retexted_queries(done, queries)
    if retexted:
        print(f"{channel}: {len(retexted)} queries changed their text since they were logged; their rows are replaced")
        delete_run_rows(ctx, run_id, channel, retexted)
    logged = set(done["query_id"]) - set(retexted)
    return queries[~queries["query_id"].isin(logged)]


def run_channel(ctx: JobContext, channel: str, retriever, queries: pd.DataFrame, cfg: ChannelsConfig, run_id: str,
                source: str) -> dict:
    shipped = ship(retriever)
    qdf = ctx.spark.createDataFrame(queries[["query_id", "query"]].astype(str))
    if cfg.query_partitions > 0:
        qdf = qdf.repartition(cfg.query_partitions)
    results = qdf.mapInPandas(search_batches(shipped, channel, cfg.top_k), OUTPUT_SCHEMA)
    out = results.select(F.lit(run_id).alias("run_id"), "query_id", "query", "channel", "product_id", "rank", "score",
                         F.current_timestamp().alias("logged_at"), F.lit(source).alias("source"))
    started = time.time()
    append_logs(ctx, out)
    seconds = time.time() - started
    return {"queries": len(queries), "seconds": round(seconds, 1), "queries_per_s": round(len(queries) / max(seconds, 1e-9), 1),
            "index_mb": round(shipped.size_mb, 1)}


# ---- the stage -------------------------------------------------------------------------------------
def _track(ctx: JobContext, cfg: ChannelsConfig, run_id: str, stats: dict, summary: dict, files: list[Path]) -> None:
    with Tracker(ctx.project, cfg.mlflow).run(f"channels {run_id}", {**dataclasses.asdict(cfg), "run_id": run_id}) as run:
        run.metrics({**summary, **stats})
        run.artifacts(files, "channel_overlap")


def _read_products(ctx: JobContext) -> pd.DataFrame:
    """The products table, sorted by product_id (raising when it is empty)."""
    products = (ctx.tables.read("products")
                .select("product_id", "title", "description", "brand", "category", "attributes", "text", "content_hash")
                .toPandas().sort_values("product_id").reset_index(drop=True))
    if products.empty:
        raise ValueError("the products table is empty; run `annomine ingest` first")
    return products


def _queries_to_run(ctx: JobContext, products: pd.DataFrame, cfg: ChannelsConfig) -> pd.DataFrame:
    """The queries of the configured origins (built ones of this builder config only), writing built queries first."""
    built_ids: set[str] = set()
    if cfg.n_built_queries:
        built_ids = set(write_built_queries(ctx, products, cfg)["query_id"])
    qall = ctx.tables.read("queries").select("query_id", "query", "origin").toPandas()
    # Built queries of an earlier, different builder config stay in the table but are not run.
    keep = qall["origin"].isin(cfg.origins) & ((qall["origin"] != "built") | qall["query_id"].isin(built_ids) | (cfg.n_built_queries == 0))
    return qall[keep].drop_duplicates("query_id").sort_values("query_id").reset_index(drop=True)


def _run_channels(ctx: JobContext, cfg: ChannelsConfig, products: pd.DataFrame, queries: pd.DataFrame, run_id: str,
                  fingerprint: str, stats: dict) -> None:
    """Build each channel's retriever and log its results for the queries not yet logged (stats get the timings)."""
    for channel in cfg.channels:
        source = f"channels/{channel}@catalog-{fingerprint}"
        todo = pending_queries(ctx, queries, run_id, channel, source, cfg.refresh)
        if todo.empty:
            print(f"{channel}: all {len(queries)} queries already logged for run {run_id}, skipped")
            continue
        if len(todo) < len(queries):
            print(f"{channel}: {len(queries) - len(todo)} queries already logged for run {run_id}; "
                  f"running {len(todo)} (new, or without results last time)")
        started = time.time()
        retriever = build_retriever(channel, ctx, products, cfg, stats)
        build_s = time.time() - started
        result = run_channel(ctx, channel, retriever, todo, cfg, run_id, source)
        stats[f"{channel}_index_build_s"] = round(build_s, 1)
        stats[f"{channel}_retrieve_s"] = result["seconds"]
        stats[f"{channel}_queries_per_s"] = result["queries_per_s"]
        print(f"{channel}: index built in {build_s:.1f}s ({result['index_mb']} MB shipped), {result['queries']} queries "
              f"retrieved and logged in {result['seconds']}s ({result['queries_per_s']} queries/s)")


def _run_logs(ctx: JobContext, run_id: str, queries: pd.DataFrame, stats: dict):
    """This run's retrieval_logs rows of these queries, with each channel's row counts printed (and put in stats)."""
    logs = ctx.tables.read("retrieval_logs").where(F.col("run_id") == run_id)
    qids = ctx.spark.createDataFrame(queries[["query_id"]].astype(str))
    logs = logs.join(qids, "query_id", "left_semi")
    counts = logs.groupBy("channel").agg(F.count(F.lit(1)).alias("rows"), F.countDistinct("query_id").alias("queries"),
                                          F.max("rank").alias("max_rank")).toPandas()
    for _, r in counts.sort_values("channel").iterrows():
        print(f"retrieval_logs[{run_id}] {r['channel']}: {r['rows']} rows, {r['queries']} queries with results, max rank {r['max_rank']}")
        stats[f"{r['channel']}_rows"] = int(r["rows"])
    return logs


def overlap_line(summary: dict) -> str:
    """One line of the overlap report: how much the channels agree and what only one of them finds."""
    if not summary.get("queries"):
        return "channel overlap: no results"
    only = ", ".join(f"{c} {summary[f'mean_only_{c}']:.1f}" for c in sorted(k[len("mean_only_"):] for k in summary
                     if k.startswith("mean_only_") and k not in ("mean_only_one", "mean_only_one_share")))
    return (f"channel overlap (top {summary['k']}, {summary['queries']} queries): Jaccard of all channels "
            f"{summary['mean_jaccard_all']:.2f}; {summary['mean_only_one_share']:.0%} of a query's union is found by "
            f"one channel only ({only} products per query)")


def run(ctx: JobContext, cfg: ChannelsConfig) -> dict:
    t0 = time.time()
    run_id = cfg.run_id()
    products = _read_products(ctx)
    fingerprint = catalog_fingerprint(products)
    stats: dict = {"products": len(products)}
    queries = _queries_to_run(ctx, products, cfg)
    print(f"channels run {run_id}: {len(queries)} queries "
          f"({', '.join(f'{k} {v}' for k, v in _value_counts(queries['origin']))}), {len(products)} products, top-{cfg.top_k}")
    stats["queries"] = len(queries)
    _run_channels(ctx, cfg, products, queries, run_id, fingerprint, stats)
    # Row counts and the overlap report over this run's queries.
    logs = _run_logs(ctx, run_id, queries, stats)
    k = min(cfg.report_k, cfg.top_k)
    per_query = overlap_per_query(logs, k, tuple(cfg.channels)).merge(queries[["query_id", "origin"]], on="query_id", how="left")
    summary = summarise(per_query, k)
    log.debug("%s", format_summary(summary, f"channel overlap, run {run_id}"))
    for origin, part in per_query.groupby("origin"):
        summary[f"by_origin_{origin}"] = summarise(part, k)
    folder = Path(cfg.report_dir) if cfg.report_dir else ctx.project.warehouse_path / "reports"
    files = save_report(per_query, {**summary, "run_id": run_id, "stats": stats}, folder, f"channel_overlap_{run_id}")
    print(overlap_line(summary) + f" (report: {files[1]})")
    stats["total_seconds"] = round(time.time() - t0, 1)
    _track(ctx, cfg, run_id, stats, summary, files)
    print(f"channels done in {stats['total_seconds']}s")
    return {"run_id": run_id, "stats": stats, "summary": summary, "report_files": files, "per_query": per_query}


def outcome(result: dict) -> str:
    """The pipeline's one-line account of a run: queries and retrieval-log rows per channel."""
    stats = result["stats"]
    rows = ", ".join(f"{k[:-len('_rows')]} {v:,}" for k, v in sorted(stats.items()) if k.endswith("_rows"))
    return f"{stats['queries']:,} queries, {stats['products']:,} products; log rows: {rows}"


def main(argv: list[str] | None = None) -> int:
    return run_job("channels", __doc__, ChannelsConfig, run, argv)


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine channels", main))
