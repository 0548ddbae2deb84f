"""Where judges live: `<warehouse>/judges/<version>.<tag>/` and the pointer `<warehouse>/judges/current.json`.

`judge train` writes a judge under `judges/_staging/` (`staging_folder`), renames the finished folder to
`judges/<version>.<tag>` (`publish_judge`) and then switches `current.json` to it (annomine.publish: the
path is stored relative to `judges/`, written by one rename), so a reader never sees a half-written judge.
A run killed before the rename leaves only its staging folder, removed by the next `judge train`.
Folders named `judges/<version>` (the older layout) are still found by their version.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from annomine.errors import MissingInputError
from annomine.publish import note_write, read_pointer, remove_unreferenced, run_folder, write_pointer

POINTER = "current.json"
STAGING = "_staging"
RERUN = "run `annomine judge train` again"


def judges_root(warehouse: str | Path) -> Path:
    return Path(warehouse).expanduser().resolve() / "judges"


@contextlib.contextmanager
def staging_folder(warehouse: str | Path, version: str) -> Iterator[Path]:
    """A new folder to write judge `version` into, after removing what killed runs left in staging."""
    staging = judges_root(warehouse) / STAGING
    remove_unreferenced(staging, "", lambda: [])
    with run_folder(staging, f"{version}.") as folder:
        yield folder


def publish_judge(warehouse: str | Path, staged: Path) -> Path:
    """Move a finished staging folder to `judges/<its name>`; the published folder (not yet current)."""
    target = judges_root(warehouse) / staged.name
    os.rename(staged, target)
    note_write(target)
    return target


def set_current(warehouse: str | Path, version: str, folder: str | Path | None = None) -> Path:
    """Point `judges/current.json` at `folder` (default `judges/<version>`); the pointer file."""
    root = judges_root(warehouse)
    root.mkdir(parents=True, exist_ok=True)
    return write_pointer(root / POINTER, {"version": version, "path": str(folder or root / version)})


def current_judge(warehouse: str | Path) -> dict:
    """The current pointer ({"version", "path"}, the path absolute); a clear error when absent or unreadable."""
    pointer = judges_root(warehouse) / POINTER
    if not pointer.is_file():
        raise MissingInputError(f"no trained judge: {pointer} does not exist; run `annomine judge train` first")
    data = read_pointer(pointer, rerun=RERUN)
    if not data.get("path") or not isinstance(data.get("version"), str):
        raise MissingInputError(f"{pointer}: no 'version' and 'path' of a judge; {RERUN}")
    if not Path(data["path"]).is_dir():
        raise MissingInputError(f"{pointer} points at {data['path']}, which does not exist; {RERUN}")
    return data


def resolve_judge(warehouse: str | Path, judge: str | None) -> Path:
    """A judge folder from a path, a version id under the warehouse, or (None) the current one."""
    if not judge:
        return Path(current_judge(warehouse)["path"])
    path = Path(judge).expanduser()
    if path.is_dir():
        return path.resolve()
    root = judges_root(warehouse)
    if (root / judge).is_dir():
        return root / judge
    pointer = root / POINTER
    if pointer.is_file() and current_judge(warehouse)["version"] == judge:
        return Path(current_judge(warehouse)["path"])
    published = sorted(p for p in root.glob(f"{judge}.*") if p.is_dir())
    if published:
        return published[-1]  # the latest run of that version
    raise MissingInputError(f"judge {judge!r} not found (neither a folder nor a version under {root})")
