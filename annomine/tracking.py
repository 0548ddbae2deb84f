"""MLflow for every stage, one way: `Tracker(project).run(name, params)`.

- One store and experiment per project. Whichever stage first creates the experiment decides where its
  artifacts go, so every stage goes through `ensure_experiment`: with a local (SQLite) store the
  artifacts live in `<warehouse>/mlartifacts`, never in a `./mlruns` of whatever directory a job ran from.
- One failure policy: tracking is a side channel. A stage's tables and files are its results; an MLflow
  failure is one warning and the stage goes on (the run id is then None).
- Parameters are flattened to `a.b.c -> text`; keys that look like secrets are left out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

from annomine.config import ProjectConfig

log = logging.getLogger(__name__)

SECRET_KEY = re.compile(r"(api_?key|token|secret|password|credential)", re.IGNORECASE)
MAX_PARAM_CHARS = 6000


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = value
    return out


def safe_params(config: dict) -> dict[str, str]:
    """Every config value as a flat `a.b.c -> str` map; keys that look like secrets are left out."""
    flat = flatten("", config, {})
    return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in flat.items() if not SECRET_KEY.search(k)}


def artifact_root(project: ProjectConfig) -> str | None:
    """Artifact folder for a local tracking store; None for a remote one (Databricks decides)."""
    if project.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in project.tracking_uri:
        return str(project.warehouse_path / "mlartifacts")
    return None


def use_tracking_store(tracking_uri: str) -> None:
    """Tracking and registry on the project's store. The registry is named outright: left unset, MLflow asks the
    active Spark session for it, and a Connect session the embedded engine has ended turns every MLflow call into
    a crash."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri("databricks-uc" if tracking_uri.startswith("databricks") else tracking_uri)


def ensure_experiment(tracking_uri: str, experiment: str, artifact_root: str | None = None) -> None:
    """Create the experiment with its artifacts under `artifact_root` (the warehouse), not ./mlruns."""
    import mlflow

    use_tracking_store(tracking_uri)
    if artifact_root and mlflow.get_experiment_by_name(experiment) is None:
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
        try:
            mlflow.create_experiment(experiment, artifact_location=Path(artifact_root).resolve().as_uri())
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            pass
    mlflow.set_experiment(experiment)


def use_experiment(project: ProjectConfig) -> None:
    """Point MLflow at the project's store and experiment, creating it in the right place."""
    ensure_experiment(project.tracking_uri, project.mlflow_experiment, artifact_root(project))


class TrackedRun:
    """What a stage logs into its run. A call that fails is one warning, never the stage's failure; every
    call is a no-op when tracking is off or MLflow was unreachable."""

    def __init__(self, mlflow_module, run_id: str | None, name: str = ""):
        self._mlflow = mlflow_module
        self.run_id = run_id
        self.name = name

    def _safely(self, what: str, call) -> None:
        if self._mlflow is None:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking is a side channel
            log.warning("MLflow: could not log %s of %s: %s", what, self.name, exc)

    def params(self, values: dict) -> None:
        items = [(k, v if len(v) <= MAX_PARAM_CHARS else v[:MAX_PARAM_CHARS - 3] + "...")
                 for k, v in safe_params(values).items()]
        for i in range(0, len(items), 100):
            self._safely("params", lambda chunk=dict(items[i:i + 100]): self._mlflow.log_params(chunk))

    def metrics(self, values: dict) -> None:
        clean = {re.sub(r"[^\w\-. /]", "_", str(k)): float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            self._safely("metrics", lambda: self._mlflow.log_metrics(clean))

    def artifacts(self, paths, folder: str | None = None) -> None:
        for path in paths:
            if path is not None and Path(path).exists():
                self._safely(f"artifact {Path(path).name}", lambda p=str(path): self._mlflow.log_artifact(p, artifact_path=folder))

    def text(self, text: str, name: str) -> None:
        self._safely(name, lambda: self._mlflow.log_text(text, name))


class Tracker:
    """The project's MLflow, with one failure policy for every stage (see the module docstring)."""

    def __init__(self, project: ProjectConfig, enabled: bool = True):
        self.project = project
        self.enabled = enabled

    @contextlib.contextmanager
    def run(self, name: str, params: dict | None = None) -> Iterator[TrackedRun]:
        """A run named `name` with `params` logged; nested inside a run already active in this process."""
        mlflow, active = None, None
        if self.enabled:
            try:
                import mlflow

                use_experiment(self.project)
                active = mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None)
            except Exception as exc:  # noqa: BLE001 - tracking is a side channel
                log.warning("MLflow (%s) is unavailable, %s is not tracked: %s", self.project.tracking_uri, name, exc)
                mlflow, active = None, None
        tracked = TrackedRun(mlflow if active else None, active.info.run_id if active else None, name)
        tracked.params(params or {})
        try:
            yield tracked
        finally:
            if active is not None:
                tracked._safely("the run's end", lambda: mlflow.end_run())
