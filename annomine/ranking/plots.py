"""The ranker's feature importance as a PNG (logged to MLflow by the rank stage)."""

from __future__ import annotations

from pathlib import Path


def plot_importance(importance: dict[str, float], path: Path, title: str) -> Path:
    """A horizontal bar chart of each feature's total gain, the largest on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4C72B0")
    ax.set_xlabel("total gain")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
