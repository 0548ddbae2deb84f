"""When is a pipeline stage current? A fingerprint of what it read, recorded after it ran.

A stage's fingerprint hashes its config section (and the project section), the Delta versions of
its input tables, and the contents of the files it reads: the source files it ingests, the shard
manifests and dev set it trains on, the pointers to the judge and the models it uses. Versions are
taken *after* the stage ran, so a stage that also writes one of its inputs (channels appends built
queries to `queries`) is still current on the next run. A stage is skipped when its fingerprint
matches the recorded one and every output it declares still exists.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from annomine.tables import TableStore


@dataclass
class StageSpec:
    name: str
    input_tables: list[str] = field(default_factory=list)
    output_tables: list[str] = field(default_factory=list)
    # Files read (pointer files, source files) and written, relative to the warehouse or absolute.
    input_files: Callable[[object, object], list[Path]] = lambda project, cfg: []
    output_files: Callable[[object, object], list[Path]] = lambda project, cfg: []
    # Input tables the stage's config names (annotate's `source`).
    configured_tables: Callable[[object, object], list[str]] = lambda project, cfg: []

    @property
    def module(self) -> str:
        """The stage's job module, as annomine.stages defines it."""
        from annomine.stages import BY_NAME

        return BY_NAME[self.name].module


def _file_digest(path: Path) -> str:
    if not path.exists():
        return "absent"
    if path.is_dir():
        return f"dir:{path.stat().st_mtime_ns}"
    if path.stat().st_size > 8 * 1024 * 1024:  # big source files: size + mtime is enough
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(stage: StageSpec, tables: TableStore, project, cfg, config_doc: dict) -> dict:
    return {
        "config": hashlib.sha256(json.dumps([config_doc.get("project"), config_doc.get(stage.name)], sort_keys=True,
                                            default=str).encode()).hexdigest(),
        "tables": {name: tables.version(name)
                   for name in sorted({*stage.input_tables, *stage.configured_tables(project, cfg)})},
        "files": {str(p): _file_digest(Path(p)) for p in stage.input_files(project, cfg)},
    }


class PipelineState:
    """The record of the last successful run of each stage, in `<warehouse>/pipeline_state.json`."""

    def __init__(self, path: Path):
        self.path = path
        self.state = json.loads(path.read_text()) if path.exists() else {}

    def is_current(self, stage: StageSpec, tables: TableStore, project, cfg, config_doc: dict) -> tuple[bool, str]:
        recorded = self.state.get(stage.name)
        if not recorded:
            return False, "never ran"
        for name in recorded.get("outputs", {}):
            if not tables.exists(name):
                return False, f"output table {name} is missing"
        for path in stage.output_files(project, cfg):
            if not Path(path).exists():
                return False, f"output {path} is missing"
        now = fingerprint(stage, tables, project, cfg, config_doc)
        for part in ("config", "tables", "files"):
            if now[part] != recorded["fingerprint"].get(part):
                before = recorded["fingerprint"].get(part) or {}
                changed = part if part == "config" else sorted(k for k in {*now[part], *before}
                                                              if now[part].get(k) != before.get(k))
                return False, f"inputs changed: {changed}"
        return True, f"current (ran {recorded['finished_at']})"

    def record(self, stage: StageSpec, tables: TableStore, project, cfg, config_doc: dict, seconds: float,
               outcome: str | None = None) -> None:
        """Record a finished run of `stage`; `outcome`: its one-line account for the closing summary."""
        self.state[stage.name] = {
            "fingerprint": fingerprint(stage, tables, project, cfg, config_doc),
            # The output tables this run produced (a stage may skip an optional one, e.g. no labels file).
            "outputs": {name: tables.version(name) for name in stage.output_tables if tables.exists(name)},
            "seconds": round(seconds, 1),
            "outcome": outcome,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True))
        tmp.replace(self.path)

    def forget(self, name: str) -> None:
        self.state.pop(name, None)
