"""MLflow set-up shared by every stage: one tracking store, and artifacts beside the warehouse.

Whichever stage first creates the experiment decides where its artifacts go, so every stage
goes through `use_experiment`: with a local (SQLite) store the experiment's artifacts live in
`<warehouse>/mlartifacts`, never in a `./mlruns` folder of whatever directory a job ran from.
"""

from __future__ import annotations

from annomine.config import ProjectConfig


def artifact_root(project: ProjectConfig) -> str | None:
    """Artifact folder for a local tracking store; None for a remote one (Databricks decides)."""
    if project.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in project.tracking_uri:
        return str(project.warehouse_path / "mlartifacts")
    return None


def use_experiment(project: ProjectConfig) -> None:
    """Point MLflow at the project's store and experiment, creating it in the right place."""
    from training.tracking import ensure_experiment

    ensure_experiment(project.tracking_uri, project.mlflow_experiment, artifact_root(project))
