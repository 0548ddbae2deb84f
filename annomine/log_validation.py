"""Validation of users' own retrieval logs (pure DataFrame transform, no I/O).

Input: the mapped string columns run_id, query_id, query, channel, product_id, rank, score,
logged_at (run_id, query, score and logged_at may be null). Output `(good, quarantined)`: `good`
in the `retrieval_logs` schema, `quarantined` in the quarantine table's. A row is refused, with a
reason naming the field, when:

- query_id, product_id or channel is missing, or the channel is not a registered one (lexical / bm25 / ann,
  `annomine.retrievers.registry`);
- rank is not a positive integer, score is not a number, logged_at is not a timestamp;
- the product is not in the catalog (when `known_products` is given);
- within one (run_id, query_id, channel), two different products share a rank, or one product
  appears at two different ranks (ranks must be unique per query and channel).

Exact duplicate rows are merged. The run id defaults to `default_run_id` (one per source file).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from annomine.ingestion import _quarantine_rows
from annomine.retrievers import registry

LOG_COLUMNS = ["run_id", "query_id", "query", "channel", "product_id", "rank", "score", "logged_at"]
REQUIRED = ["query_id", "channel", "product_id", "rank"]


def _blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def _first_reason(df: DataFrame, reason: Column) -> DataFrame:
    return df.withColumn("_reason", F.coalesce(F.col("_reason"), reason))


def validate_retrieval_logs(mapped: DataFrame, source: str, default_run_id: str,
                            known_products: DataFrame | None = None) -> tuple[DataFrame, DataFrame]:
    raw_cols = [c for c in LOG_COLUMNS if c in mapped.columns]
    df = mapped
    for c in LOG_COLUMNS:
        if c not in df.columns:
            df = df.withColumn(c, F.lit(None).cast("string"))
    df = (df.withColumn("query_id", F.trim("query_id"))
            .withColumn("product_id", F.trim("product_id"))
            .withColumn("channel", F.lower(F.trim("channel")))
            .withColumn("run_id", F.when(_blank(F.col("run_id")), F.lit(default_run_id)).otherwise(F.trim("run_id"))))
    channels = registry.names()
    rank_text = F.trim("rank")
    # try_* casts: a bad value becomes null (then a reason) instead of failing the whole job.
    rank_num = rank_text.try_cast("double")
    rank_ok = rank_text.rlike(r"^\+?[0-9]{1,9}(\.0+)?$") & (rank_num >= 1)
    score_num = F.trim("score").try_cast("double")
    ts = F.try_to_timestamp(F.trim("logged_at"))
    df = df.withColumn(
        "_reason",
        F.when(_blank(F.col("query_id")), F.lit("missing query_id"))
         .when(_blank(F.col("product_id")), F.lit("missing product_id"))
         .when(_blank(F.col("channel")), F.lit("missing channel"))
         .when(~F.col("channel").isin(*channels),
               F.concat(F.lit("unknown channel '"), F.col("channel"), F.lit(f"' (expected one of {', '.join(channels)})")))
         .when(_blank(F.col("rank")), F.lit("missing rank"))
         .when(~rank_ok, F.concat(F.lit("rank must be a positive integer, got '"), F.col("rank"), F.lit("'")))
         .when(~_blank(F.col("score")) & score_num.isNull(),
               F.concat(F.lit("score is not a number: '"), F.col("score"), F.lit("'")))
         .when(~_blank(F.col("logged_at")) & ts.isNull(),
               F.concat(F.lit("logged_at is not a timestamp: '"), F.col("logged_at"), F.lit("'"))),
    )
    if known_products is not None:
        known = known_products.select(F.col("product_id").alias("_known_pid")).distinct()
        df = df.join(known, df["product_id"] == known["_known_pid"], "left")
        df = _first_reason(df, F.when(F.col("_known_pid").isNull(), F.lit("unknown product_id (not in the products table)"))).drop("_known_pid")
    df = df.withColumn("_rank", F.when(F.col("_reason").isNull(), rank_num.cast("int")))
    # Uniqueness within (run_id, query_id, channel), among the rows that passed so far; exact duplicates collapse first.
    ok = df.where(F.col("_reason").isNull()).dropDuplicates(["run_id", "query_id", "channel", "product_id", "_rank", "score"])
    group = ["run_id", "query_id", "channel"]
    ok = (ok.withColumn("_per_product", F.count(F.lit(1)).over(Window.partitionBy(*group, "product_id")))
            .withColumn("_per_rank", F.count(F.lit(1)).over(Window.partitionBy(*group, "_rank"))))
    ok = ok.withColumn(
        "_reason",
        F.when(F.col("_per_product") > 1,
               F.concat(F.lit("product_id listed at "), F.col("_per_product").cast("string"),
                        F.lit(" ranks for the same query and channel (ranks must be unique per query+channel)")))
         .when(F.col("_per_rank") > 1,
               F.concat(F.lit("rank "), F.col("_rank").cast("string"), F.lit(" used by "), F.col("_per_rank").cast("string"),
                        F.lit(" products for the same query and channel (ranks must be unique per query+channel)"))),
    ).drop("_per_product", "_per_rank")
    rejected = df.where(F.col("_reason").isNotNull()).drop("_rank").unionByName(ok.where(F.col("_reason").isNotNull()).drop("_rank"))
    quarantined = _quarantine_rows(rejected, "retrieval_logs", source, ["run_id", "query_id", "channel", "product_id"], raw_cols)
    good = ok.where(F.col("_reason").isNull()).select(
        "run_id", "query_id",
        F.when(_blank(F.col("query")), F.lit(None).cast("string")).otherwise(F.trim("query")).alias("query"),
        "channel", "product_id", F.col("_rank").cast("int").alias("rank"), score_num.alias("score"),
        F.coalesce(ts, F.current_timestamp()).alias("logged_at"), F.lit(source).alias("source"),
    )
    return good, quarantined
