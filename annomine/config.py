"""Typed, validated job configuration loaded from `conf/*.yaml`.

A config file has a `project` section shared by every job and one section per job. Each job
declares a dataclass; `load_job_config` builds it from the file, expanding `${VAR}` and
`${VAR:-default}` from the environment, applying `--set section.key=value` overrides, and
refusing unknown keys or wrong types with an error that names the key and the file.

Secrets never live here: a config names the environment variable (or secret scope) that holds
a key, never the key itself.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from annomine.bounds import bounded, check_bounds
from annomine.errors import AnnomineError
from annomine.splits import check_fold, check_rotation

T = TypeVar("T")


class ConfigError(AnnomineError, ValueError):
    """A config file is invalid; the message names the file and the key."""


@dataclass
class SegmentsConfig:
    """Head / torso / tail by cumulative share of traffic: queries ordered by frequency, a query is head
    while the traffic of the queries before it is below `head_share` of the total, torso below
    `torso_share`, else tail. One rule for ingest, the query-log builder and the evaluation."""

    head_share: float = 0.5
    torso_share: float = 0.8

    def validate(self) -> None:
        if not 0 < self.head_share < self.torso_share < 1:
            raise ValueError("need 0 < head_share < torso_share < 1")


@dataclass
class ProjectConfig:
    """Settings shared by every job: where tables live and how to reach Spark and MLflow."""

    name: str = "annomine"
    # Local Delta warehouse folder (embedded engine). Ignored for tables when `catalog` is set.
    warehouse: str = "warehouse"
    # Unity Catalog namespace: when `catalog` is set, tables are `catalog.schema.table`.
    catalog: str | None = None
    schema: str = "annomine"
    # Spark Connect URL (sc://...). Empty: SPARK_REMOTE, an active session, or embedded Sail.
    spark_remote: str | None = None
    # Which engine a process without an active session starts (annomine/spark.py): 'auto' (spark_remote /
    # SPARK_REMOTE, else embedded Sail) or 'local_jvm' (classic PySpark, `local[N]`, in this process; the
    # process must be classic: ANNOMINE_SPARK_MODE=classic before annomine is imported).
    engine: Literal["auto", "local_jvm"] = "auto"
    spark_master: str = "local[2]"  # the master of a local_jvm session
    # Extra Spark settings for a session annomine creates (local_jvm), e.g. the Delta packages.
    spark_conf: dict[str, str] = field(default_factory=dict)
    # Table folders (no catalog): 'delta' (default; MERGE, versions, time travel) or 'parquet' (versioned
    # Parquet folders written by annomine itself: for a JVM Spark without the Delta jars; one writer at a time).
    table_format: Literal["delta", "parquet"] = "delta"
    # MLflow tracking URI; empty means a SQLite store inside the warehouse.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "annomine"
    seed: int = 13
    # Grade scale of human labels and judges (CrowdFlower: 1..4, the paper: 0..4).
    min_grade: int = 1
    max_grade: int = 4
    segments: SegmentsConfig = field(default_factory=SegmentsConfig)
    # Which half of the held-out labelled queries selects (dev) and which reports (test), annomine/splits.py:
    # 0 = the committed split; 1 = the two swapped. The train queries (judge, training sets) are the same in
    # both. A fold's shards, models and reports live under <warehouse>/folds/fold<N>/ (fold 0: the warehouse).
    fold: int = 0
    # Which block of the open labelled queries is held out (annomine/splits.py): 0 = the committed split. Another
    # rotation trains its own judge and training sets without that block's labels, so it lives in a warehouse of
    # its own, <warehouse>/rotations/rotation<N>/ (tables, judges, MLflow, folds); the lab (`python -m lab.pool
    # --rotations`) pools every rotation's folds from the base warehouse.
    rotation: int = 0

    def validate(self) -> None:
        if self.min_grade >= self.max_grade:
            raise ValueError(f"min_grade ({self.min_grade}) must be below max_grade ({self.max_grade})")
        check_fold(self.fold)
        check_rotation(self.rotation)
        if self.rotation and self.catalog and f"rotation{self.rotation}" not in self.schema:
            raise ValueError(f"rotation {self.rotation} with catalog {self.catalog!r}: its tables must not be rotation 0's; "
                             f"set project.schema to a schema of its own (e.g. {self.schema}_rotation{self.rotation})")
        if self.table_format == "parquet" and self.catalog:
            raise ValueError("table_format 'parquet' keeps tables as folders under the warehouse; "
                             "it cannot be combined with catalog (catalog tables are Delta)")
        if self.engine == "local_jvm" and self.spark_remote:
            raise ValueError("engine 'local_jvm' starts a classic session in this process; spark_remote must be empty")
        if self.engine == "local_jvm" and self.table_format == "delta" and not any(
                "delta" in str(self.spark_conf.get(k, "")).lower() for k in ("spark.jars.packages", "spark.jars")):
            raise ValueError("engine 'local_jvm' with table_format 'delta' needs the Delta jars: set "
                             "spark_conf {spark.jars.packages: io.delta:delta-spark_4.2_2.13:4.4.1, spark.sql.extensions: "
                             "io.delta.sql.DeltaSparkSessionExtension, spark.sql.catalog.spark_catalog: "
                             "org.apache.spark.sql.delta.catalog.DeltaCatalog} (docs/spark_submit.md), or table_format: parquet")
        if not re.fullmatch(r"local(\[(\*|\d+)(,\s*\d+)?\])?", self.spark_master.strip()):
            raise ValueError(f"spark_master must be local, local[N] or local[*] (a local_jvm session), got {self.spark_master!r}")

    @property
    def base_warehouse_path(self) -> Path:
        """The warehouse folder as configured (rotation 0's; every rotation's lives under it)."""
        return Path(self.warehouse).expanduser().resolve()

    @property
    def warehouse_path(self) -> Path:
        """This rotation's warehouse: the configured folder for rotation 0, else <warehouse>/rotations/rotation<N>."""
        base = self.base_warehouse_path
        return base if self.rotation == 0 else base / "rotations" / f"rotation{self.rotation}"

    @property
    def outputs_path(self) -> Path:
        """Where this fold's shards, models and evaluation reports live (tables and caches stay shared)."""
        return self.warehouse_path if self.fold == 0 else self.warehouse_path / "folds" / f"fold{self.fold}"

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.warehouse_path / 'mlflow.db'}"


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set and has no default")

        return _ENV_PATTERN.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against the first member of the union `tp` that accepts it (None when optional)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against (and converted to) bool, int, float or str; unchanged for any other `tp`."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_type, f"{where}.{k}"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {list(allowed)}, got {value!r}")
        return value
    return _coerce_scalar(value, tp, where)


def from_dict(cls: type[T], data: dict, where: str) -> T:
    """Build dataclass `cls` from `data`, naming `where` (file:section.key) in every error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required key '{f.name}' is missing")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    for key, problem in check_bounds(obj):
        raise ConfigError(f"{where}.{key}: {problem}")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return obj


def _apply_override(doc: dict, assignment: str, path: str) -> None:
    """Apply one `--set section.key=value`; the value is YAML (`[1, 2]`, `true`, `3e-5`)."""
    if "=" not in assignment:
        raise ConfigError(f"{path}: --set {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"{path}: --set {assignment!r} must look like section.key=value (empty name)")
    if len(keys) < 2:
        raise ConfigError(f"{path}: --set {assignment!r} names no key inside a section (section.key=value)")
    node = doc
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: --set {dotted!r} goes through a value that is not a mapping")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: --set {dotted}: {raw!r} is not a valid YAML value ({str(exc).splitlines()[0]})") from exc


def check_sections(doc: dict, path: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse a top-level key that no stage reads (a typo would otherwise be ignored)."""
    from annomine.stages import ANCHOR_PREFIX, CONFIG_SECTIONS

    known = (*CONFIG_SECTIONS, *extra)
    unknown = [k for k in doc if k not in known and not str(k).startswith(ANCHOR_PREFIX)]
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {list(known)} "
                          f"(keys starting with '{ANCHOR_PREFIX}' may hold YAML anchors)")


def read_config_document(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The YAML document of a config file, env-expanded, with `--set` overrides applied."""
    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); is it the YAML config?") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for assignment in overrides or []:
        _apply_override(doc, assignment, path)
    return _expand_env(doc, path)


def load_project_config(path: str | os.PathLike, overrides: list[str] | None = None) -> ProjectConfig:
    doc = read_config_document(path, overrides)
    check_sections(doc, str(path))
    return from_dict(ProjectConfig, doc.get("project") or {}, f"{path}:project")


def load_job_config(path: str | os.PathLike, section: str, cls: type[T], overrides: list[str] | None = None) -> tuple[ProjectConfig, T]:
    """(project config, job config) for `section` of the file at `path`."""
    doc = read_config_document(path, overrides)
    check_sections(doc, str(path), (section,))
    project = from_dict(ProjectConfig, doc.get("project") or {}, f"{path}:project")
    job_doc = doc.get(section) or {}
    if not isinstance(job_doc, dict):
        raise ConfigError(f"{path}:{section}: must be a mapping")
    return project, from_dict(cls, job_doc, f"{path}:{section}")


__all__ = [
    "ConfigError",
    "check_sections",
    "ProjectConfig",
    "SegmentsConfig",
    "field",
    "from_dict",
    "load_job_config",
    "load_project_config",
    "read_config_document",
]
