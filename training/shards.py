"""Parquet training shards: the writer (per stage, fixed row groups, even file count, manifest) and
the streaming reader that gives every rank a disjoint slice each epoch.

Shards are plain Parquet (primitive columns and lists of primitives only), so Petastorm's
`make_batch_reader` can read them too; here they are read with pyarrow, one row group at a time.

Layout under a variant's folder (`annomine curriculum` writes it, annomine.publish):

    <root>/manifest.json                  the published set: the manifest below plus "run" (its folder) and stage
                                          folders relative to <root>; written last, by one rename
    <root>/run-<tag>/manifest.json        {"variant", "stages": [{stage, name, loss, rows, files, file_rows,
                                          row_group_size, schema, folder}], "sources": {table: version}}
    <root>/run-<tag>/stage<k>_<name>/part-00000.parquet ...
    <root>/run-<tag>/dev_eval.parquet, dev_pool.parquet   the dev check the set was written with

Each run of the curriculum writes a new `run-<tag>` folder and switches `<root>/manifest.json` to it, so a
reader sees the old set or the new one, never a mix; `published_shards` gives the published folder and
`check_shards` refuses a set whose files are missing, empty or of other row counts than its manifest. A
`<root>` without "run" in its manifest (stage folders directly under it) is read as before.

Reader contract (`ShardReader`): the stage's rows, in (file, row) order, are cut into `world`
contiguous ranges whose sizes differ by at most one; in epoch e, rank r reads range (r + e) % world.
So every row is read exactly once per epoch over all ranks. All ranks run the same number of steps,
`steps = ceil(ceil(rows / world) / batch_size)`, and each rank splits its range into that many batches
of near-equal size. Inside its range a rank shuffles the order of row groups and then rows through a
bounded shuffle buffer, so memory stays at about `shuffle_buffer` rows plus one row group.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from annomine.errors import AnnomineError
from annomine.publish import note_write, read_pointer, remove_unreferenced, write_atomically

log = logging.getLogger(__name__)

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
RUN_PREFIX = "run-"
LEGACY_STAGE_PREFIX = "stage"
RERUN = "run `annomine curriculum` again"


class ShardSetError(AnnomineError):
    """A shard set that does not match its manifest (the message names the file)."""


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
        note_write(path)
        files.append(path.name)
    return {"rows": int(table.num_rows), "files": files, "file_rows": [int(b - a) for a, b in zip(bounds, bounds[1:])],
            "row_group_size": row_group_size, "schema": [f"{f.name}: {f.type}" for f in SHARD_SCHEMA]}


def write_manifest(root: str | os.PathLike, manifest: dict) -> Path:
    text = json.dumps(manifest, indent=2, sort_keys=True)
    return write_atomically(Path(root) / MANIFEST, lambda tmp: tmp.write_text(text))


def publish_shards(root: str | os.PathLike, run_dir: str | os.PathLike, manifest: dict) -> dict:
    """Publish the set written in `run_dir` (a folder under `root`): its own manifest, then `root`'s, which
    names it; then remove the sets no longer published. `manifest`'s stage folders are relative to `run_dir`;
    the published manifest (stage folders relative to `root`)."""
    root, run_dir = Path(root), Path(run_dir)
    write_manifest(run_dir, manifest)
    outer = dict(manifest, run=run_dir.name,
                 stages=[dict(e, folder=f"{run_dir.name}/{e['folder']}") for e in manifest["stages"]])
    write_manifest(root, outer)
    prune_shards(root)
    return outer


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}; run `annomine curriculum` first")
    manifest = read_pointer(path, ("run",), RERUN)
    if not isinstance(manifest.get("stages"), list):
        raise ShardSetError(f"{path}: no 'stages' list; {RERUN}")
    return manifest


def published_shards(root: str | os.PathLike) -> Path:
    """The folder of `root`'s published set: its `run-<tag>` folder, or `root` itself in the older layout."""
    run = read_manifest(root).get("run")
    return Path(run) if run else Path(root)


def prune_shards(root: str | os.PathLike) -> list[Path]:
    """Remove the run folders under `root` that its manifest does not publish (killed runs' leftovers, older
    sets no reader holds), and the stage folders of the older layout once a run folder is published."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        return remove_unreferenced(root, RUN_PREFIX, lambda: [])
    try:
        published = published_shards(root)
    except AnnomineError as exc:  # what it publishes is unknown: keep everything
        log.warning("not pruning %s: %s", root, exc)
        return []
    removed = remove_unreferenced(root, RUN_PREFIX, lambda: [published_shards(root)])
    if published != root:
        removed += remove_unreferenced(root, LEGACY_STAGE_PREFIX, lambda: [])
    return removed


def _file_rows(path: str) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except FileNotFoundError:
        raise ShardSetError(f"{path}: shard file missing; {RERUN}") from None
    except (OSError, pa.ArrowException) as exc:
        raise ShardSetError(f"{path}: not a readable Parquet shard ({exc}); {RERUN}") from exc


def check_shards(root: str | os.PathLike) -> dict:
    """The manifest of the set in `root` after checking every stage's files exist and hold the rows it lists."""
    manifest = read_manifest(root)
    for entry in manifest["stages"]:
        files = stage_files(root, entry)
        counts = [_file_rows(f) for f in files]
        expected = entry.get("file_rows") or [None] * len(files)
        for f, n, want in zip(files, counts, expected):
            if want is not None and n != want:
                raise ShardSetError(f"{f}: {n} rows, its manifest {Path(root) / MANIFEST} lists {want}; {RERUN}")
        if sum(counts) != entry["rows"]:
            raise ShardSetError(f"{Path(root) / entry['folder']}: {sum(counts)} rows, its manifest {Path(root) / MANIFEST} "
                                f"lists {entry['rows']}; {RERUN}")
    return manifest


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
