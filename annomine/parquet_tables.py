"""Versioned Parquet table folders: the table format for a Spark without the Delta jars.

`project.table_format: parquet` (annomine.tables) keeps each table as

    <warehouse>/<schema>/<table>/_annomine_table.json     {"format": "parquet", "version": k, "data": "v0000k"}
    <warehouse>/<schema>/<table>/v0000k/part-*.parquet     the rows of version k

A write never touches the version it may be reading from: it writes version k+1 into its own folder,
then replaces the pointer file atomically (`os.replace`), which is the commit; a crash before that
leaves version k current. The last `KEEP_VERSIONS` versions stay on disk, so a DataFrame planned over an
older version still reads while the next writes commit. One writer at a time (no conflict detection:
annotate and train already hold the warehouse lock). MERGE is emulated by `TableStore` over these
writes; the local filesystem is the only storage supported (like `project.warehouse` itself).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import types as T

POINTER = "_annomine_table.json"
KEEP_VERSIONS = 3


def pointer(location: Path) -> dict | None:
    """The table's pointer file, or None when the folder holds no committed Parquet table."""
    path = Path(location) / POINTER
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def exists(location: Path) -> bool:
    return pointer(location) is not None


def version(location: Path) -> int | None:
    current = pointer(location)
    return None if current is None else int(current["version"])


def data_path(location: Path) -> Path:
    """The folder of the current version's files."""
    current = pointer(location)
    if current is None:
        raise FileNotFoundError(f"{location}: no Parquet table ({POINTER} is missing)")
    return Path(location) / current["data"]


def read(spark, location: Path, schema: T.StructType) -> DataFrame:
    """The current version, read with the table's schema (an empty version has no file to infer it from)."""
    return spark.read.schema(schema).parquet(str(data_path(location)))


def write(df: DataFrame, location: Path) -> int:
    """Write `df` as the next version and commit it; return the new version number."""
    location = Path(location)
    current = version(location)
    new = 0 if current is None else current + 1
    folder = f"v{new:05d}"
    location.mkdir(parents=True, exist_ok=True)
    # a folder of this name can only be left by a crashed, uncommitted write: overwrite it
    df.write.mode("overwrite").parquet(str(location / folder))
    tmp = location / f".{POINTER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"format": "parquet", "version": new, "data": folder}), encoding="utf-8")
    os.replace(tmp, location / POINTER)
    _prune(location, new)
    return new


def _prune(location: Path, current: int) -> None:
    for child in location.iterdir():
        name = child.name
        if child.is_dir() and len(name) == 6 and name[0] == "v" and name[1:].isdigit() \
                and int(name[1:]) <= current - KEEP_VERSIONS:
            shutil.rmtree(child, ignore_errors=True)


def ddl(schema: T.StructType) -> str:
    """Column list for CREATE TABLE (`a` string, `b` array<string>, ...)."""
    return ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in schema.fields)
