"""Reading users' files (TSV, CSV, Parquet, JSONL, Delta) into string DataFrames with a column mapping.

A source names a path, a format (default: from the file extension) and a mapping from annomine's
column names to the file's own, e.g. for a catalog whose id column is `sku`:

    products: {path: /data/catalog.parquet, columns: {product_id: sku, title: name}}

Columns that are neither mapped nor known can be kept as product attributes
(`attribute_columns`). A file that lacks a required column is a wrong file schema: the job
fails loudly, naming the file and the column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from annomine.errors import AnnomineError

FORMATS = ("tsv", "csv", "parquet", "jsonl", "json", "delta")


class SourceSchemaError(AnnomineError, ValueError):
    """A source file does not have the columns a job needs."""


@dataclass
class SourceConfig:
    path: str
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    attribute_columns: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        path = Path(self.path)
        if (path / "_delta_log").is_dir():
            return "delta"
        suffix = path.suffix.lower().lstrip(".")
        if suffix in ("ndjson",):
            return "jsonl"
        if suffix in FORMATS:
            return suffix
        if path.is_dir():
            return "parquet"
        raise SourceSchemaError(f"{self.path}: cannot tell the format from the extension; set `format`")


def read_raw(spark, source: SourceConfig) -> DataFrame:
    """Read a source file as-is (all columns, text formats as strings)."""
    fmt = source.resolved_format
    path = str(Path(source.path).expanduser().resolve()) if "://" not in source.path else source.path
    if "://" not in source.path and not Path(path).exists():
        raise SourceSchemaError(f"source file not found: {source.path}")
    if fmt in ("tsv", "csv"):
        return (spark.read.option("header", True).option("sep", "\t" if fmt == "tsv" else ",")
                .option("quote", '"').option("escape", '"').option("multiLine", True).csv(path))
    if fmt in ("jsonl", "json"):
        return spark.read.json(path)
    if fmt == "parquet":
        return spark.read.parquet(path)
    return spark.read.format("delta").load(path)


def select_mapped(df: DataFrame, source: SourceConfig, required: list[str], optional: list[str]) -> DataFrame:
    """Rename the file's columns to annomine's, cast to string, add missing optional ones as null."""
    available = set(df.columns)
    out = []
    for name in required + optional:
        src = source.columns.get(name, name)
        if src in available:
            out.append(F.col(f"`{src}`").cast("string").alias(name))
        elif name in required:
            raise SourceSchemaError(
                f"{source.path}: required column '{src}' (for '{name}') not found; the file has {sorted(available)}. "
                f"Map it with `columns: {{{name}: <your column>}}`"
            )
        else:
            out.append(F.lit(None).cast("string").alias(name))
    if source.attribute_columns:
        missing = [c for c in source.attribute_columns if c not in available]
        if missing:
            raise SourceSchemaError(f"{source.path}: attribute column(s) {missing} not found; the file has {sorted(available)}")
        pairs = [F.concat(F.lit(f"{c}: "), F.col(f"`{c}`").cast("string")) for c in source.attribute_columns]
        out.append(F.concat_ws("; ", *pairs).alias("_attributes"))
    return df.select(*out)
