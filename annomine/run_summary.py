"""Each command's machine-readable summary, as a file: `<outputs>/runs/<name>_summary.json`.

The terminal gets a few lines for a person (what ran, the counts, where this file is); the full
summary (metrics, forecasts, per-tier usage) goes here, and MLflow where the command logs there.
`read_summary` gives it back (the pipeline's closing summary reads the judge's, annotate's and
the pilot's). Names are the command's: `judge_train`, `judge_calibrate`, `judge_eval`,
`judge_pilot`, `annotate`, `annotate_forecast`, `curriculum`, `mine`, `channels`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def summary_path(project, name: str) -> Path:
    """Where command `name` keeps its latest summary in this project's (fold's) outputs."""
    return project.outputs_path / "runs" / f"{name}_summary.json"


def write_summary(project, name: str, data: dict) -> Path:
    """Write `data` as the latest summary of `name` (whole or not at all) and return its path."""
    path = summary_path(project, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=_plain)
    os.replace(tmp, path)
    return path


def read_summary(project, name: str) -> dict | None:
    """The latest summary of `name`, or None when it never ran here (or its file is unreadable)."""
    path = summary_path(project, name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _plain(value):
    """numpy scalars and arrays, paths and anything else json cannot write: as numbers, lists or text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
