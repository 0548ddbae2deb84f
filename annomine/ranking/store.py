"""Where rankers live: `<outputs>/rankers/<version>/` and the pointer `<outputs>/rankers/current.json`.

A ranker folder holds `rank.json` (the retriever, the judge, the feature settings, the label choice and what
the dev queries said), one LightGBM model per published variant (`VARIANT_FILES`) and the feature-importance
plot. The folder is written first under its own name; the pointer, written last and atomically, names it and
the retriever and judge by paths relative to the warehouse, so a warehouse that moves keeps its rankers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from annomine.errors import MissingInputError

POINTER = "current.json"
META = "rank.json"
# Evaluate's model spec -> the model file in the ranker folder: the ranker, and the paper's ablations.
VARIANT_FILES = {"ranked": "ranker", "ranked-raw": "ablation_raw", "ranked-no-ce": "ablation_no_ce"}


def rankers_dir(outputs: Path) -> Path:
    return Path(outputs) / "rankers"


def relative_to(path: str | Path | None, warehouse: Path) -> str | None:
    """`path` relative to the warehouse when it lies inside it, else absolute."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(warehouse).resolve()))
    except ValueError:
        return str(path)


def resolve(path: str | None, warehouse: Path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.is_absolute() else Path(warehouse).resolve() / p


def publish(folder: Path, outputs: Path, warehouse: Path, version: str) -> Path:
    """Point `<outputs>/rankers/current.json` at the written folder (written last, atomically)."""
    pointer = rankers_dir(outputs) / POINTER
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{POINTER}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": version, "path": relative_to(folder, warehouse)}, indent=2))
    os.replace(tmp, pointer)
    return pointer


@dataclass
class PublishedRanker:
    folder: Path
    meta: dict
    warehouse: Path

    def path_of(self, key: str) -> Path | None:
        return resolve(self.meta.get(key), self.warehouse)

    def model(self, variant: str):
        from annomine.ranking.model import Ranker

        if variant not in VARIANT_FILES or not (self.folder / f"{VARIANT_FILES[variant]}.txt").is_file():
            have = [v for v, f in VARIANT_FILES.items() if (self.folder / f"{f}.txt").is_file()]
            raise MissingInputError(f"{self.folder}: no '{variant}' ranker (this folder has {have})")
        return Ranker.load(self.folder, VARIANT_FILES[variant])


def from_folder(folder: Path) -> PublishedRanker:
    """A ranker folder on its own: its warehouse is found from the folder's place in it (`rank.json`'s `folder`)."""
    folder = Path(folder).resolve()
    meta = json.loads((folder / META).read_text())
    depth = len(Path(meta["folder"]).parts)
    return PublishedRanker(folder, meta, folder.parents[depth - 1])


def load_published(outputs: Path, warehouse: Path) -> PublishedRanker:
    """The current ranker of `outputs` (a fold's outputs folder), or a MissingInputError naming the pointer."""
    pointer = rankers_dir(outputs) / POINTER
    if not pointer.is_file():
        raise MissingInputError(f"no trained ranker: {pointer} does not exist; run `annomine rank` first")
    try:
        entry = json.loads(pointer.read_text())
        folder = resolve(entry["path"], warehouse)
    except (ValueError, KeyError, TypeError) as exc:
        raise MissingInputError(f"{pointer}: not a readable ranker pointer ({exc})") from exc
    if not (folder / META).is_file():
        raise MissingInputError(f"{pointer} points at {folder}, which holds no {META}")
    return PublishedRanker(folder, json.loads((folder / META).read_text()), Path(warehouse).resolve())
