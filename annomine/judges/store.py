"""Where judges live: `<warehouse>/judges/<version>/` and the pointer `<warehouse>/judges/current.json`."""

from __future__ import annotations

import json
from pathlib import Path


def judges_root(warehouse: str | Path) -> Path:
    return Path(warehouse).expanduser().resolve() / "judges"


def set_current(warehouse: str | Path, version: str) -> Path:
    root = judges_root(warehouse)
    root.mkdir(parents=True, exist_ok=True)
    pointer = root / "current.json"
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": version, "path": str(root / version)}))
    tmp.replace(pointer)
    return pointer


def resolve_judge(warehouse: str | Path, judge: str | None) -> Path:
    """A judge folder from a path, a version id under the warehouse, or (None) the current one."""
    if judge:
        path = Path(judge).expanduser()
        if path.is_dir():
            return path.resolve()
        candidate = judges_root(warehouse) / judge
        if candidate.is_dir():
            return candidate
        raise FileNotFoundError(f"judge {judge!r} not found (neither a folder nor a version under {judges_root(warehouse)})")
    pointer = judges_root(warehouse) / "current.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"no trained judge: {pointer} does not exist; run `annomine judge train` first")
    data = json.loads(pointer.read_text())
    path = Path(data["path"])
    if not path.is_dir():
        path = judges_root(warehouse) / data["version"]
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} points at {data['path']}, which does not exist")
    return path
