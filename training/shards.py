"""Parquet training shards: the writer (per stage, fixed row groups, even file count, manifest) and
the streaming reader that gives every rank a disjoint slice each epoch.

Shards are plain Parquet (primitive columns and lists of primitives only), so Petastorm's
`make_batch_reader` can read them too; here they are read with pyarrow, one row group at a time.

Layout under a root folder:

    <root>/manifest.json                  {"variant", "stages": [{stage, name, loss, rows, files, row_group_size, schema}], "sources": {table: version}}
    <root>/stage<k>_<name>/part-00000.parquet ...

Reader contract (`ShardReader`): the stage's rows, in (file, row) order, are cut into `world`
contiguous ranges whose sizes differ by at most one; in epoch e, rank r reads range (r + e) % world.
So every row is read exactly once per epoch over all ranks. All ranks run the same number of steps,
`steps = ceil(ceil(rows / world) / batch_size)`, and each rank splits its range into that many batches
of near-equal size. Inside its range a rank shuffles the order of row groups and then rows through a
bounded shuffle buffer, so memory stays at about `shuffle_buffer` rows plus one row group.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("query", pa.string()),
    ("product_id", pa.string()),
    ("item_text", pa.string()),
    ("label", pa.int32()),
    ("grade", pa.int32()),
    ("candidate_class", pa.string()),
    ("level", pa.int32()),
    ("neg_product_id", pa.string()),
    ("neg_text", pa.string()),
    ("neg_grade", pa.int32()),
    ("neg_class", pa.string()),
    ("neg_level", pa.int32()),
    ("group_product_ids", pa.list_(pa.string())),
    ("group_texts", pa.list_(pa.string())),
    ("group_grades", pa.list_(pa.int32())),
])

MANIFEST = "manifest.json"


def _to_table(df: pd.DataFrame) -> pa.Table:
    missing = [f.name for f in SHARD_SCHEMA if f.name not in df.columns]
    if missing:
        raise ValueError(f"shard rows lack column(s) {missing}")
    cols = {}
    for f in SHARD_SCHEMA:
        values = df[f.name]
        if pa.types.is_list(f.type):
            values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else list(v) for v in values]
        elif pa.types.is_integer(f.type):
            values = [None if pd.isna(v) else int(v) for v in values]
        else:
            values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values]
        cols[f.name] = pa.array(values, type=f.type)
    return pa.table(cols, schema=SHARD_SCHEMA)


def write_stage_shards(df: pd.DataFrame, folder: str | os.PathLike, *, num_files: int, row_group_size: int,
                       seed: int = 13) -> dict:
    """Shuffle `df` (seeded) and write it as `num_files` Parquet files of fixed-size row groups.

    Files get near-equal row counts; each file's row groups hold `row_group_size` rows (the last
    one of a file may be shorter). Old part files in `folder` are removed first (idempotent).
    The shuffle starts from the rows in a canonical order (sorted by their values), not from the order
    `df` came in: a DataFrame collected from Spark arrives in whatever order the engine's partitions
    finished, so the same rows give the same shards on every engine and every run.
    """
    if num_files < 1 or row_group_size < 1:
        raise ValueError("num_files and row_group_size must be positive")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    table = _to_table(df.reset_index(drop=True))
    keys = [json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist()]
    canonical = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
    order = canonical[np.random.default_rng(seed).permutation(len(keys))]
    table = table.take(pa.array(order, type=pa.int64()))
    bounds = np.linspace(0, table.num_rows, num_files + 1).astype(int)
    files = []
    for i in range(num_files):
        path = out / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), path, row_group_size=row_group_size,
                       compression="zstd")
        files.append(path.name)
    return {"rows": int(table.num_rows), "files": files, "row_group_size": row_group_size,
            "schema": [f"{f.name}: {f.type}" for f in SHARD_SCHEMA]}


def write_manifest(root: str | os.PathLike, manifest: dict) -> Path:
    path = Path(root) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}; run `annomine curriculum` first")
    return json.loads(path.read_text())


def stage_files(root: str | os.PathLike, stage_entry: dict) -> list[str]:
    folder = Path(root) / stage_entry["folder"]
    return [str(folder / f) for f in stage_entry["files"]]


@dataclass(frozen=True)
class _RowGroup:
    file: str
    index: int
    start: int  # global row offset
    rows: int


class ShardReader:
    """Rank-partitioned, shuffled, streaming batches over a stage's Parquet files."""

    def __init__(self, files: list[str], *, rank: int = 0, world_size: int = 1, batch_size: int = 64,
                 seed: int = 13, shuffle_buffer: int = 4096, columns: list[str] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle_buffer, self.columns = seed, max(1, shuffle_buffer), columns
        self.groups: list[_RowGroup] = []
        offset = 0
        for f in files:
            meta = pq.ParquetFile(f).metadata
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                self.groups.append(_RowGroup(f, i, offset, n))
                offset += n
        self.total_rows = offset
        if self.total_rows < world_size:
            raise ValueError(f"{self.total_rows} rows cannot feed {world_size} ranks")
        self.bounds = np.linspace(0, self.total_rows, world_size + 1).astype(int)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.total_rows / self.world_size) / self.batch_size)

    def row_range(self, epoch: int) -> tuple[int, int]:
        part = (self.rank + epoch) % self.world_size
        return int(self.bounds[part]), int(self.bounds[part + 1])

    def batch_sizes(self, epoch: int) -> list[int]:
        lo, hi = self.row_range(epoch)
        n, steps = hi - lo, self.steps_per_epoch
        return [n // steps + (1 if k < n % steps else 0) for k in range(steps)]

    def _rows(self, epoch: int):
        """This rank's rows for `epoch`, shuffled through a bounded buffer (pandas rows as dicts)."""
        lo, hi = self.row_range(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        mine = [g for g in self.groups if g.start < hi and g.start + g.rows > lo]
        buffer: list[dict] = []
        open_files: dict[str, pq.ParquetFile] = {}
        for g in (mine[i] for i in rng.permutation(len(mine))):
            pf = open_files.setdefault(g.file, pq.ParquetFile(g.file))
            table = pf.read_row_group(g.index, columns=self.columns)
            a, b = max(lo, g.start) - g.start, min(hi, g.start + g.rows) - g.start
            buffer.extend(table.slice(a, b - a).to_pylist())
            while len(buffer) > self.shuffle_buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def epoch(self, epoch: int, start: int = 0):
        """Yield this rank's `steps_per_epoch` batches (lists of row dicts) of `epoch`, from batch `start` on.

        The order depends only on (seed, epoch, rank), so a resumed run that skips the `start` batches
        it had trained before its last checkpoint gets exactly the batches the uninterrupted run got.
        """
        rows = self._rows(epoch)
        for k, size in enumerate(self.batch_sizes(epoch)):
            batch = [next(rows) for _ in range(size)]
            if k >= start:
                yield batch
