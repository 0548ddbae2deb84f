"""Split the rows of a DataFrame into chunks of at most `size` rows that stay the same while the plan is
re-evaluated.

A job that grades chunk after chunk and commits each one (annotate) collects one chunk at a time on the
driver, so a chunk must never grow past its size. Each row gets a sort key (`order_key`: a hash of its key
columns, unique per key); one pass numbers the rows in that order and collects the key of every
`size`-th row, the first of each chunk. Chunk i is then the rows whose key lies in [bound i, bound i+1):
fixed values, so a chunk stays the same rows (or fewer: rows committed meanwhile drop out of a filter that
reads the target table) however often the plan is evaluated. The driver holds the bounds, one string per
chunk, never the rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

ORDER = "_chunk_order"


def order_key(columns: list[str]) -> Column:
    """A string sort key, unique per value of `columns` (SHA-256 of their values joined by U+0001)."""
    return F.sha2(F.concat_ws("\u0001", *[F.coalesce(F.col(c).cast("string"), F.lit("")) for c in columns]), 256)


def chunk_bounds(df: DataFrame, key: list[str], size: int) -> list[str]:
    """The sort key of the first row of every chunk of `size` rows, in order (empty for no rows)."""
    with warnings.catch_warnings():  # one partition numbers the rows: only their sort keys move there
        warnings.filterwarnings("ignore", message=".*No Partition Defined for Window operation.*")
        numbered = df.select(order_key(key).alias(ORDER)).withColumn("_n", F.row_number().over(Window.orderBy(ORDER)))
        firsts = numbered.filter((F.col("_n") - 1) % F.lit(int(size)) == 0).select(ORDER).toPandas()
    return sorted(firsts[ORDER].astype(str).tolist())


def chunks(df: DataFrame, key: list[str], size: int) -> Iterator[DataFrame]:
    """The chunks of `df` (at most `size` rows each, in sort-key order), as filters of `df`."""
    keyed = df.withColumn(ORDER, order_key(key))
    bounds = chunk_bounds(df, key, size)
    for i, low in enumerate(bounds):
        inside = F.col(ORDER) >= F.lit(low)
        if i + 1 < len(bounds):
            inside = inside & (F.col(ORDER) < F.lit(bounds[i + 1]))
        yield keyed.filter(inside).drop(ORDER)
