"""Pure DataFrame transforms that validate bronze rows and split them into loaded and quarantined.

Each `validate_*` takes mapped string columns and returns `(good, quarantined)`: `good` in the
target table's schema, `quarantined` in the quarantine table's. Nothing is dropped silently: a
row either loads, is an exact duplicate of a loaded row, or is quarantined with a reason.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.functions import pandas_udf

from annomine import text as textlib


@pandas_udf(T.StringType())
def _repair_mojibake(s):
    return textlib.pandas_repair_mojibake(s)


@pandas_udf(T.StringType())
def _encoding_problem(s):
    return textlib.pandas_encoding_problem(s)


@pandas_udf(T.StringType())
def _product_text(title, attributes, description):
    return textlib.pandas_product_text(title, attributes, description)


def _blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def _quarantine_rows(rejected: DataFrame, target: str, source: str, key_cols: list[str], raw_cols: list[str]) -> DataFrame:
    raw = F.to_json(F.struct(*[F.col(c) for c in raw_cols]))
    # The row's own key plus a hash of its content: two different rows never share a record key,
    # and the same row quarantined again (a re-run) lands on the same one.
    record_key = F.concat(F.concat_ws("|", *[F.coalesce(F.col(c), F.lit("")) for c in key_cols]), F.lit("#"),
                          F.substring(F.sha2(raw, 256), 1, 16))
    return rejected.select(
        F.lit(target).alias("target_table"),
        F.lit(source).alias("source"),
        record_key.alias("record_key"),
        F.col("_reason").alias("reason"),
        raw.alias("raw"),
        F.current_timestamp().alias("quarantined_at"),
    )


def _split_conflicting_duplicates(df: DataFrame, key_cols: list[str], content: Column, what: str) -> DataFrame:
    """Mark rows whose key appears with different content; exact duplicates stay (dropped later)."""
    versions = (df.where(F.col("_reason").isNull())
                .select(*key_cols, content.alias("_content"))
                .groupBy(*key_cols).agg(F.countDistinct("_content").alias("_versions")))
    joined = df.join(versions, on=key_cols, how="left")
    reason = F.concat(F.lit(f"duplicate {what} with different content ("), F.col("_versions").cast("string"), F.lit(" versions)"))
    return joined.withColumn(
        "_reason", F.when(F.col("_reason").isNull() & (F.col("_versions") > 1), reason).otherwise(F.col("_reason"))
    ).drop("_versions")


def validate_products(mapped: DataFrame, source: str) -> tuple[DataFrame, DataFrame]:
    """mapped: product_id, title, description, brand, category, attributes[, _attributes] (strings)."""
    raw_cols = [c for c in mapped.columns]
    df = mapped
    if "_attributes" in df.columns:
        df = df.withColumn("attributes", F.coalesce(F.col("attributes"), F.col("_attributes"))).drop("_attributes")
        raw_cols = [c for c in raw_cols if c != "_attributes"] + ["attributes"]
    df = (df.withColumn("product_id", F.trim("product_id"))
            .withColumn("title", F.trim(_repair_mojibake(F.col("title"))))
            .withColumn("description", F.coalesce(_repair_mojibake(F.col("description")), F.lit(""))))
    title_problem = _encoding_problem(F.col("title"))
    # A title is the product's identity: undecodable characters there quarantine the row. In a
    # description, stray control characters (common in scraped HTML) are removed instead.
    df = df.withColumn("description", F.regexp_replace("description", "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]", " "))
    df = df.withColumn(
        "_reason",
        F.when(_blank(F.col("product_id")), F.lit("missing product_id"))
         .when(_blank(F.col("title")), F.lit("empty title"))
         .when(title_problem.isNotNull(), F.concat(F.lit("title: "), title_problem)),
    )
    content = F.sha2(F.concat_ws("\u0001", "title", "description", "brand", "category", "attributes"), 256)
    df = _split_conflicting_duplicates(df, ["product_id"], content, "product_id")
    quarantined = _quarantine_rows(df.where(F.col("_reason").isNotNull()), "products", source, ["product_id"], raw_cols)
    good = (df.where(F.col("_reason").isNull())
              .dropDuplicates(["product_id"])
              .select(
                  "product_id", "title", "description", "brand", "category", "attributes",
                  _product_text(F.col("title"), F.concat_ws("; ", "brand", "category", "attributes"), F.col("description")).alias("text"),
                  content.alias("content_hash"),
                  F.lit(source).alias("source"),
                  F.current_timestamp().alias("ingested_at"),
              ))
    return good, quarantined


def assign_segments(queries: DataFrame, head_share: float = 0.5, torso_share: float = 0.8) -> DataFrame:
    """head / torso / tail by cumulative share of traffic (frequency), null where frequency is unknown.

    Queries are ordered by frequency (desc, then query_id); a query is head while the traffic of all
    queries up to and including it is <= head_share of the total, torso up to torso_share, else tail.
    """
    known = queries.where(F.col("frequency").isNotNull())
    unknown = queries.where(F.col("frequency").isNull()).withColumn("segment", F.lit(None).cast("string"))
    order = Window.orderBy(F.col("frequency").desc(), F.col("query_id")).rowsBetween(Window.unboundedPreceding, Window.currentRow)
    total = known.agg(F.sum("frequency").alias("_total"))
    ranked = (known.crossJoin(total)
              .withColumn("_cum", F.sum("frequency").over(order) / F.col("_total"))
              .withColumn("_prev", F.col("_cum") - F.col("frequency") / F.col("_total")))
    segmented = ranked.withColumn(
        "segment",
        F.when(F.col("_prev") < head_share, "head").when(F.col("_prev") < torso_share, "torso").otherwise("tail"),
    ).drop("_total", "_cum", "_prev")
    return segmented.unionByName(unknown.select(*segmented.columns))


def validate_queries(mapped: DataFrame, source: str, origin: str) -> tuple[DataFrame, DataFrame]:
    """mapped: query_id, query, frequency (strings)."""
    raw_cols = list(mapped.columns)
    df = (mapped.withColumn("query_id", F.trim("query_id"))
                .withColumn("query", F.trim(_repair_mojibake(F.col("query")))))
    freq_ok = F.col("frequency").isNull() | F.trim("frequency").rlike(r"^[0-9]+$")
    problem = _encoding_problem(F.col("query"))
    df = df.withColumn(
        "_reason",
        F.when(_blank(F.col("query_id")), F.lit("missing query_id"))
         .when(_blank(F.col("query")), F.lit("empty query"))
         .when(problem.isNotNull(), F.concat(F.lit("query: "), problem))
         .when(~freq_ok, F.lit("frequency is not a non-negative integer")),
    )
    df = _split_conflicting_duplicates(df, ["query_id"], F.col("query"), "query_id")
    quarantined = _quarantine_rows(df.where(F.col("_reason").isNotNull()), "queries", source, ["query_id"], raw_cols)
    good = (df.where(F.col("_reason").isNull()).dropDuplicates(["query_id"])
              .select("query_id", "query", F.trim("frequency").cast("bigint").alias("frequency")))
    good = assign_segments(good).select(
        "query_id", "query", "frequency", "segment",
        F.lit(origin).alias("origin"), F.lit(source).alias("source"), F.current_timestamp().alias("ingested_at"),
    )
    return good, quarantined


def validate_labels(mapped: DataFrame, source: str, min_grade: int, max_grade: int) -> tuple[DataFrame, DataFrame]:
    """mapped: query_id, product_id, grade, variance (strings).

    Several judgments of one (query, product) pair are normal (several raters, or a listing that
    appears twice): they are merged, not refused. The merged grade is the rounded mean and the
    variance adds the spread between the judgments to their mean variance.
    """
    raw_cols = list(mapped.columns)
    df = mapped.withColumn("query_id", F.trim("query_id")).withColumn("product_id", F.trim("product_id"))
    grade = F.trim("grade").cast("double")
    df = df.withColumn(
        "_reason",
        F.when(_blank(F.col("query_id")), F.lit("missing query_id"))
         .when(_blank(F.col("product_id")), F.lit("missing product_id"))
         .when(grade.isNull() | (grade != F.floor(grade)), F.lit("grade is not an integer"))
         .when((grade < min_grade) | (grade > max_grade), F.lit(f"grade outside {min_grade}..{max_grade}"))
         .when(F.col("variance").isNotNull() & F.trim("variance").cast("double").isNull(), F.lit("variance is not a number")),
    )
    quarantined = _quarantine_rows(df.where(F.col("_reason").isNotNull()), "human_labels", source, ["query_id", "product_id"], raw_cols)
    good = (df.where(F.col("_reason").isNull())
              .withColumn("_grade", grade)
              .withColumn("_variance", F.coalesce(F.trim("variance").cast("double"), F.lit(0.0)))
              .groupBy("query_id", "product_id")
              .agg(F.avg("_grade").alias("_mean"), F.avg("_variance").alias("_var"), F.var_pop("_grade").alias("_spread"))
              .select("query_id", "product_id", F.floor(F.col("_mean") + 0.5).cast("int").alias("grade"),
                      F.round(F.col("_var") + F.coalesce(F.col("_spread"), F.lit(0.0)), 3).alias("variance"),
                      F.lit(source).alias("source"), F.current_timestamp().alias("ingested_at")))
    return good, quarantined
