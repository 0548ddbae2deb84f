"""Pure DataFrame transforms that validate bronze rows and split them into loaded and quarantined.

Each `validate_*` takes mapped string columns and returns `(good, quarantined)`: `good` in the
target table's schema, `quarantined` in the quarantine table's. Nothing is dropped silently: a
row either loads, is an exact duplicate of a loaded row, or is quarantined with a reason.

A bad value never fails the job: numbers are parsed with try-casts (null instead of an error)
and range-checked, and the row is quarantined with a reason naming the value and the column
(`bad value 'abc' in column grade (expected an integer 1..4)`). An id that is blank or one of
NaN / null / None (any case) is a missing id. `as_text_columns` turns a file's typed columns into
the text the ids had in the file (a Parquet float id 1.0 is '1', not '1.0').
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.functions import pandas_udf

from annomine import text as textlib
from annomine.config import SegmentsConfig


@pandas_udf(T.StringType())
def _repair_mojibake(s):
    return textlib.pandas_repair_mojibake(s)


@pandas_udf(T.StringType())
def _encoding_problem(s):
    return textlib.pandas_encoding_problem(s)


@pandas_udf(T.StringType())
def _product_text(title, attributes, description):
    return textlib.pandas_product_text(title, attributes, description)


# Ids that mean "no id": what pandas, Spark and spreadsheets write for a missing value.
MISSING_ID_TOKENS = ("", "nan", "null", "none")
MAX_BIGINT = 2**63 - 1
_SHOWN_CHARS = 60


def _blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def _missing_id(col: Column) -> Column:
    return col.isNull() | F.lower(F.trim(col)).isin(*MISSING_ID_TOKENS)


def _number_text(col: Column, dtype: T.DataType) -> Column:
    """A numeric column as the text of its value: integral values without a fraction, NaN as null."""
    if isinstance(dtype, T.DecimalType) and dtype.scale == 0:
        return col.cast("string")
    # From the value itself (Spark's float -> string would give '1.0' for an id 1).
    as_long = col.try_cast("bigint")
    integral = as_long.isNotNull() & (col == as_long)
    text = F.when(integral, as_long.cast("string")).otherwise(col.cast("string"))
    if isinstance(dtype, (T.FloatType, T.DoubleType)):
        text = F.when(F.isnan(col), F.lit(None).cast("string")).otherwise(text)
    return text


def as_text_columns(raw: DataFrame) -> DataFrame:
    """Every numeric column of a file as text that keeps the value's form; other columns unchanged.

    Integers keep their decimal text; floats and decimals holding a whole number lose the '.0'
    (ids 1.0, 2.0 in a Parquet float column are '1', '2'); NaN becomes null (a missing value).
    """
    fractional = (T.FloatType, T.DoubleType, T.DecimalType)
    cols = []
    for f in raw.schema.fields:
        col = F.col(f"`{f.name}`")
        if isinstance(f.dataType, fractional):
            col = _number_text(col, f.dataType)
        elif isinstance(f.dataType, T.IntegralType):
            col = col.cast("string")
        cols.append(col.alias(f.name))
    return raw.select(*cols)


def _shown(col: Column) -> Column:
    """A value as quoted in a reason: at most _SHOWN_CHARS characters, never null."""
    value = F.coalesce(col, F.lit(""))
    return F.when(F.length(value) > _SHOWN_CHARS, F.concat(F.substring(value, 1, _SHOWN_CHARS - 3), F.lit("..."))).otherwise(value)


def _bad_value(column: str, expected: str) -> Column:
    return F.concat(F.lit("bad value '"), _shown(F.col(column)), F.lit(f"' in column {column} (expected {expected})"))


def _whole_number(text: Column) -> Column:
    """The integer a text holds ('4', ' 4 ', '4.0'), else null (never an error)."""
    number = F.trim(text).try_cast("double")
    as_long = number.try_cast("bigint")
    return F.when(~F.isnan(number) & (number == as_long), as_long)


def _bigint_text(text: Column) -> Column:
    """A non-negative integer written as digits that fits a bigint, else null (never an error)."""
    digits = F.trim(text)
    return F.when(digits.rlike(r"^[0-9]+$"), digits.try_cast("bigint"))


def _first_reason(df: DataFrame, reason: Column) -> DataFrame:
    return df.withColumn("_reason", F.coalesce(F.col("_reason"), reason))


def _check_known(df: DataFrame, column: str, known: DataFrame) -> DataFrame:
    """Rows whose `column` is not among `known`'s get the reason `unknown <column> 'X'`."""
    ids = known.select(F.col(column).alias("_known")).distinct()
    joined = df.join(ids, df[column] == ids["_known"], "left")
    reason = F.concat(F.lit(f"unknown {column} '"), _shown(F.col(column)), F.lit("'"))
    return _first_reason(joined, F.when(F.col("_known").isNull(), reason)).drop("_known")


def _with_raw(df: DataFrame) -> DataFrame:
    """Keep the row as read (JSON, in `_raw`), before any cleaning, for the quarantine."""
    return df.withColumn("_raw", F.to_json(F.struct(*[F.col(c) for c in df.columns])))


def _quarantine_rows(rejected: DataFrame, target: str, source: str, key_cols: list[str], raw_cols: list[str] | None) -> DataFrame:
    """Rejected rows (with `_reason`) as quarantine rows; raw_cols None: the raw row is `_raw` (`_with_raw`)."""
    raw = F.col("_raw") if raw_cols is None else F.to_json(F.struct(*[F.col(c) for c in raw_cols]))
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
    df = mapped
    if "_attributes" in df.columns:
        df = df.withColumn("attributes", F.coalesce(F.col("attributes"), F.col("_attributes"))).drop("_attributes")
    df = (_with_raw(df).withColumn("product_id", F.trim("product_id"))
            .withColumn("title", F.trim(_repair_mojibake(F.col("title"))))
            .withColumn("description", F.coalesce(_repair_mojibake(F.col("description")), F.lit(""))))
    title_problem = _encoding_problem(F.col("title"))
    # A title is the product's identity: undecodable characters there quarantine the row. In a
    # description, stray control characters (common in scraped HTML) are removed instead.
    df = df.withColumn("description", F.regexp_replace("description", "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]", " "))
    df = df.withColumn(
        "_reason",
        F.when(_missing_id(F.col("product_id")), F.lit("missing product_id"))
         .when(_blank(F.col("title")), F.lit("empty title"))
         .when(title_problem.isNotNull(), F.concat(F.lit("title: "), title_problem)),
    )
    content = F.sha2(F.concat_ws("\u0001", "title", "description", "brand", "category", "attributes"), 256)
    df = _split_conflicting_duplicates(df, ["product_id"], content, "product_id")
    quarantined = _quarantine_rows(df.where(F.col("_reason").isNotNull()), "products", source, ["product_id"], None)
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


def assign_segments(queries: DataFrame, rule: SegmentsConfig | None = None) -> DataFrame:
    """head / torso / tail by cumulative share of traffic (`project.segments`), null where frequency is
    unknown. Queries are ordered by frequency (desc, then query_id)."""
    rule = rule or SegmentsConfig()
    known = queries.where(F.col("frequency").isNotNull())
    unknown = queries.where(F.col("frequency").isNull()).withColumn("segment", F.lit(None).cast("string"))
    order = Window.orderBy(F.col("frequency").desc(), F.col("query_id")).rowsBetween(Window.unboundedPreceding, Window.currentRow)
    total = known.agg(F.sum("frequency").alias("_total"))
    ranked = (known.crossJoin(total)
              .withColumn("_cum", F.sum("frequency").over(order) / F.col("_total"))
              .withColumn("_prev", F.col("_cum") - F.col("frequency") / F.col("_total")))
    segmented = ranked.withColumn(
        "segment",
        F.when(F.col("_prev") < rule.head_share, "head").when(F.col("_prev") < rule.torso_share, "torso").otherwise("tail"),
    ).drop("_total", "_cum", "_prev")
    return segmented.unionByName(unknown.select(*segmented.columns))


def validate_queries(mapped: DataFrame, source: str, origin: str,
                     segments: SegmentsConfig | None = None) -> tuple[DataFrame, DataFrame]:
    """mapped: query_id, query, frequency (strings). A blank frequency is unknown (null)."""
    df = (_with_raw(mapped).withColumn("query_id", F.trim("query_id"))
                .withColumn("query", F.trim(_repair_mojibake(F.col("query"))))
                .withColumn("_frequency", _bigint_text(F.col("frequency"))))
    problem = _encoding_problem(F.col("query"))
    df = df.withColumn(
        "_reason",
        F.when(_missing_id(F.col("query_id")), F.lit("missing query_id"))
         .when(_blank(F.col("query")), F.lit("empty query"))
         .when(problem.isNotNull(), F.concat(F.lit("query: "), problem))
         .when(~_blank(F.col("frequency")) & F.col("_frequency").isNull(),
               _bad_value("frequency", f"an integer 0..{MAX_BIGINT}")),
    )
    df = _split_conflicting_duplicates(df, ["query_id"], F.col("query"), "query_id")
    quarantined = _quarantine_rows(df.where(F.col("_reason").isNotNull()), "queries", source, ["query_id"], None)
    good = (df.where(F.col("_reason").isNull()).dropDuplicates(["query_id"])
              .select("query_id", "query", F.col("_frequency").alias("frequency")))
    good = assign_segments(good, segments).select(
        "query_id", "query", "frequency", "segment",
        F.lit(origin).alias("origin"), F.lit(source).alias("source"), F.current_timestamp().alias("ingested_at"),
    )
    return good, quarantined


def validate_labels(mapped: DataFrame, source: str, min_grade: int, max_grade: int,
                    known_queries: DataFrame, known_products: DataFrame) -> tuple[DataFrame, DataFrame]:
    """mapped: query_id, product_id, grade, variance (strings); known_*: the ids labels may point at.

    Several judgments of one (query, product) pair are normal (several raters, or a listing that
    appears twice): they are merged, not refused. The merged grade is the rounded mean and the
    variance adds the spread between the judgments to their mean variance. A blank variance is 0.
    """
    df = (_with_raw(mapped).withColumn("query_id", F.trim("query_id")).withColumn("product_id", F.trim("product_id"))
                .withColumn("_grade", _whole_number(F.col("grade")))
                .withColumn("_variance", F.trim("variance").try_cast("double")))
    grade_ok = F.col("_grade").isNotNull() & F.col("_grade").between(min_grade, max_grade)
    variance_ok = F.col("_variance").isNotNull() & ~F.isnan("_variance") & (F.col("_variance") >= 0) & (F.col("_variance") < float("inf"))
    df = df.withColumn(
        "_reason",
        F.when(_missing_id(F.col("query_id")), F.lit("missing query_id"))
         .when(_missing_id(F.col("product_id")), F.lit("missing product_id"))
         .when(_blank(F.col("grade")), F.lit("missing grade"))
         .when(~grade_ok, _bad_value("grade", f"an integer {min_grade}..{max_grade}"))
         .when(~_blank(F.col("variance")) & ~variance_ok, _bad_value("variance", "a number >= 0")),
    )
    df = _check_known(df, "query_id", known_queries)
    df = _check_known(df, "product_id", known_products)
    quarantined = _quarantine_rows(df.where(F.col("_reason").isNotNull()), "human_labels", source, ["query_id", "product_id"], None)
    good = (df.where(F.col("_reason").isNull())
              .withColumn("_variance", F.coalesce("_variance", F.lit(0.0)))
              .groupBy("query_id", "product_id")
              .agg(F.avg("_grade").alias("_mean"), F.avg("_variance").alias("_var"), F.var_pop("_grade").alias("_spread"))
              .select("query_id", "product_id", F.floor(F.col("_mean") + 0.5).cast("int").alias("grade"),
                      F.round(F.col("_var") + F.coalesce(F.col("_spread"), F.lit(0.0)), 3).alias("variance"),
                      F.lit(source).alias("source"), F.current_timestamp().alias("ingested_at")))
    return good, quarantined
