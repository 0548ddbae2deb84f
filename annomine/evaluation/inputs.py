"""Evaluation inputs from files in the CrowdFlower layout, or from the ingested tables.

Files (TSV/CSV/Parquet/JSONL by extension): products (product_id, title[, description]), queries
(query_id, query[, frequency]) and labels (query_id, product_id, grade[, variance]). Product text is
built exactly like `products.text` at ingest: mojibake repaired, control characters removed,
`annomine.text.product_text(title, None, description)`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from annomine import text as textlib
from annomine.errors import AnnomineError
from annomine.evaluation.catalog import Catalog

log = logging.getLogger(__name__)

_CONTROL = re.compile("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]")


class InputError(AnnomineError, ValueError):
    """An input file is missing or lacks a required column."""


def read_file(path: str, required: list[str], optional: list[str] = ()) -> pd.DataFrame:
    """A file as string columns (missing optional columns are absent, not invented)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise InputError(f"input file not found: {path}")
    suffix = file.suffix.lower()
    if suffix in (".tsv", ".csv", ".txt"):
        df = pd.read_csv(file, sep="," if suffix == ".csv" else "\t", dtype=str, keep_default_na=False,
                         quotechar='"', doublequote=True, encoding="utf-8")
    elif suffix in (".parquet", ".pq") or file.is_dir():
        df = pd.read_parquet(file).astype(str)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        df = pd.read_json(file, lines=suffix != ".json", dtype=str)
    else:
        raise InputError(f"{path}: unknown format (use .tsv, .csv, .parquet or .jsonl)")
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing required column(s) {missing}; the file has {list(df.columns)}")
    keep = list(required) + [c for c in optional if c in df.columns]
    return df[keep].copy()


def file_product_text(title: str | None, description: str | None) -> tuple[str, str]:
    """(clean title, text) as ingest builds them for a file without brand/category/attributes."""
    title = (textlib.repair_mojibake(title) or "").strip()
    description = _CONTROL.sub(" ", textlib.repair_mojibake(description) or "")
    return title, textlib.product_text(title, None, description)


def catalog_from_file(path: str) -> tuple[Catalog, dict]:
    df = read_file(path, ["product_id", "title"], ["description"])
    if "description" not in df.columns:
        df["description"] = ""
    ids, texts, seen = [], [], set()
    skipped = {"missing product_id": 0, "empty title": 0, "duplicate product_id (first kept)": 0}
    for pid, title, desc in zip(df["product_id"], df["title"], df["description"]):
        pid = str(pid).strip()
        clean_title, text = file_product_text(title, desc)
        if not pid:
            skipped["missing product_id"] += 1
        elif not clean_title:
            skipped["empty title"] += 1
        elif pid in seen:
            skipped["duplicate product_id (first kept)"] += 1
        else:
            seen.add(pid)
            ids.append(pid)
            texts.append(text)
    skipped = {k: v for k, v in skipped.items() if v}
    if skipped:
        log.warning("%s: products skipped: %s", path, skipped)
    # Sorted by id like the table mode: equal scores (duplicate listings) then break ties the same way.
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return Catalog([ids[i] for i in order], [texts[i] for i in order]), {"source": str(path), "rows": int(len(df)), "products": len(ids), "skipped": skipped}


def catalog_from_table(tables) -> tuple[Catalog, dict]:
    """Table mode: ids and a hash of each row's text on the driver; texts stay in Spark until needed."""
    from pyspark.sql import functions as F

    frame = tables.read("products").select("product_id", "text")
    row = F.sha2(F.concat_ws("\t", F.col("product_id"), F.coalesce(F.col("text"), F.lit(""))), 256)
    keys = frame.select("product_id", row.alias("row_hash")).orderBy("product_id").toPandas()
    catalog = Catalog(keys["product_id"].astype(str).tolist(), row_hashes=keys["row_hash"].tolist(), frame=frame)
    return catalog, {"source": f"table {tables.qualified_name('products')}", "products": len(catalog)}


def queries_from_file(path: str) -> pd.DataFrame:
    df = read_file(path, ["query_id", "query"], ["frequency"])
    df["query_id"] = df["query_id"].astype(str).str.strip()
    df["query"] = df["query"].map(lambda q: (textlib.repair_mojibake(q) or "").strip())
    if "frequency" in df.columns:
        df["frequency"] = pd.to_numeric(df["frequency"].replace("", None), errors="coerce")
    return _dedupe_queries(df, path)


def queries_from_table(tables) -> pd.DataFrame:
    df = tables.read("queries").select("query_id", "query", "frequency", "segment").toPandas()
    return _dedupe_queries(df, f"table {tables.qualified_name('queries')}")


def _dedupe_queries(df: pd.DataFrame, source: str) -> pd.DataFrame:
    empty = df["query_id"].eq("") | df["query"].eq("")
    if empty.any():
        log.warning("%s: %d queries without an id or text skipped (lines %s)", source, int(empty.sum()),
                    [int(i) + 2 for i in df.index[empty][:10]])
    df = df[~empty]
    dup = df["query_id"].duplicated()
    if dup.any():
        log.warning("%s: %d duplicate query_id rows, the first of each kept", source, int(dup.sum()))
    return df[~dup].reset_index(drop=True)


def labels_from_file(path: str) -> pd.DataFrame:
    return read_file(path, ["query_id", "product_id", "grade"], ["variance"])


def labels_from_table(tables) -> pd.DataFrame:
    return tables.read("human_labels").select("query_id", "product_id", "grade", "variance").toPandas()
