"""The evaluation report: JSON, markdown, PNG plots, MLflow logging and model registration."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from annomine.evaluation.metrics import METRICS, SEGMENTS
from annomine.tracking import use_tracking_store

log = logging.getLogger(__name__)

SHORT = {"ndcg@10": "NDCG@10", "ndcg@10_judged": "NDCG@10 judged-only", "lowest_share@10": "lowest-grade share@10",
         "recall@100_top": "Recall@100 top-grade"}


def clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            value = list(value)
            return clean(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def write_json(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(report), indent=2, ensure_ascii=False))
    return path


def _fmt(est: dict | None, pct: bool = False) -> str:
    if not est or est.get("mean") is None:
        return "n/a"
    scale = 100.0 if pct else 1.0
    digits = 1 if pct else 4
    suffix = "%" if pct else ""
    return (f"{est['mean'] * scale:.{digits}f}{suffix} "
            f"[{est['ci_low'] * scale:.{digits}f}, {est['ci_high'] * scale:.{digits}f}]")


def _paired_cells(c: dict) -> tuple[str, str]:
    """(ratio, 'difference [CI]') of one paired comparison."""
    d = c["diff"]
    ratio = "n/a" if c["ratio"] is None else f"{c['ratio']:.3f}x"
    return ratio, f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def comparison_line(c: dict) -> str:
    """'curriculum vs minilm, ndcg@10: 0.8342 / 0.8016 = 1.041x, paired diff +0.0326 [+0.0010, +0.0650] over 41 queries'."""
    ratio, diff = _paired_cells(c)
    return (f"{c['model']} vs {c['against']}, {c['metric']}: {c['model_mean']:.4f} / {c['baseline_mean']:.4f} = {ratio}, "
            f"paired diff {diff} over {c['diff']['n']} queries")


def model_table(report: dict) -> list[str]:
    """The comparison table: one row per model, metrics with their CIs."""
    lines = ["| model | NDCG@10 (unjudged=0) | NDCG@10 judged-only | lowest-grade share@10 | Recall@100 top-grade | queries | "
             "judged@10 | no judged in top 10 | trained on (mined / human pairs) |", "|---|---|---|---|---|---|---|---|---|"]
    for model in report["models"]:
        m = model["metrics"]["all"]
        judged = m.get("judged_share@10")
        spec = model.get("spec") or {}
        pairs = spec.get("training_pairs")
        trained = "-" if pairs is None else f"{pairs.get('mined', 0)} / {pairs.get('human', 0)}"
        if pairs is not None and spec.get("trained_models"):
            trained += f" (mean of {len(spec['trained_models'])} models)"
        lines.append(f"| {model['label']} | {_fmt(m['ndcg@10'])} | {_fmt(m['ndcg@10_judged'])} | "
                     f"{_fmt(m['lowest_share@10'], pct=True)} | {_fmt(m['recall@100_top'])} | {m['n_queries']} | "
                     f"{'n/a' if judged is None else f'{judged * 100:.1f}%'} | {m['n_queries_without_judged_top10']} | {trained} |")
    return lines


def comparison_table(report: dict) -> list[str]:
    """Each trained model against the baselines, paired over the same queries (empty without baselines)."""
    if not report.get("comparisons"):
        return []
    lines = ["| model | metric | baseline | model / baseline | ratio | paired difference [95% CI] | queries |",
             "|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        ratio, diff = _paired_cells(c)
        lines.append(f"| {c['model']} | {c['metric']} | {c['against']} | {c['model_mean']:.4f} / {c['baseline_mean']:.4f} | "
                     f"{ratio} | {diff} | {c['diff']['n']} |")
    return lines


def plot_paths(report_file: Path) -> dict[str, Path]:
    """The PNGs the evaluate stage writes next to its report JSON."""
    report_file = Path(report_file)
    return {"metrics": report_file.with_name(report_file.stem + "_metrics.png"),
            "grades": report_file.with_name(report_file.stem + "_grades_top10.png"),
            "data": report_file.with_name(report_file.stem + "_ndcg_vs_mined_pairs.png")}


def registration_line(registration: dict | None) -> str | None:
    if not registration:
        return None
    if not registration.get("registered"):
        return f"not registered: {registration.get('reason')}"
    return (f"registered {registration['model']} as {registration['name']} version {registration['version']} "
            f"(dev NDCG@10 {registration['dev_ndcg@10']:.4f})")


def summary(report: dict, report_file: Path) -> list[str]:
    """What a run ends with: the table, the paired comparison, one plot and the registration."""
    inputs = report.get("inputs", {})
    lines = [f"evaluation, split {report['split']}: {inputs.get('n_queries_evaluated')} queries, "
             f"{inputs.get('n_labels')} labels, {inputs.get('n_products')} products ({report_file})", "",
             *model_table(report)]
    paired = comparison_table(report)
    if paired:
        lines += ["", *paired]
    plot = plot_paths(report_file)["metrics"]
    if plot.is_file():
        lines += ["", f"plot: {plot}"]
    registered = registration_line(report.get("registration"))
    if registered:
        lines.append(registered)
    return lines


def teacher_lines(teacher: dict | None, rotation: str | None = None) -> list[str]:
    """The judge's order of each query's labelled products against the zero-shot bi-encoder's: what bounds the
    gain of a retriever trained on its grades."""
    if not teacher:
        return []
    lines = ["", "## The judge as a teacher" + (f" (rotation {rotation})" if rotation is not None else ""), "",
             f"Judge `{teacher.get('judge_version')}`: each query's labelled products ordered by its expected grade and by "
             "the zero-shot bi-encoder, NDCG@10 against the human grades, paired. A guide to what training on the judge's "
             "grades can add, not a bound.", ""]
    for split in ("dev", "test"):
        r = teacher.get(split)
        if r and r["diff"].get("mean") is not None:
            ratio, diff = _paired_cells(r)
            lines.append(f"- {split} ({r['n_queries']} queries): judge {_fmt(r['judge_ndcg@10'])}, {r['baseline']} "
                         f"{_fmt(r['baseline_ndcg@10'])}: {ratio}, paired {diff}")
    return lines


def _segment_table(models: list[dict], metric: str, pct: bool = False) -> list[str]:
    """The markdown table of one metric per query segment, a row per model."""
    lines = ["| model | " + " | ".join(SEGMENTS) + " |", "|---|" + "---|" * len(SEGMENTS)]
    for model in models:
        cells = [_fmt(model["metrics"].get(s, {}).get(metric), pct=pct) for s in SEGMENTS]
        lines.append(f"| {model['label']} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    """The comparison table, per-segment NDCG@10 and the facts needed to reproduce it."""
    conf = int(round(report["bootstrap"]["confidence"] * 100))
    lines = [f"# Evaluation: {report['inputs'].get('n_queries_evaluated')} queries, split `{report['split']}`", ""]
    lines += [f"Mean over queries with a {conf}% bootstrap confidence interval ({report['bootstrap']['resamples']} "
              f"resamples of queries). Gain = grade - {report['grade_scale']['min']}; ndcg unjudged = 0 counts retrieved "
              f"items without a label as gain 0, judged-only drops them first. Lowest-grade share: among judged items of "
              f"the top 10 (queries without any are left out). Index: `{report['index']}`.", ""]
    if report.get("rotations"):
        lines += ["Pooled over rotations (annomine/splits.py): " + "; ".join(
            f"rotation {r['rotation']}: {r['n_queries']} test queries over both folds" for r in report["rotations"])
            + (f"; not yet run: rotation(s) {report['rotations_missing']}" if report.get("rotations_missing") else "")
            + ". " + report["split_role"] + ".", ""]
    elif report.get("folds"):
        lines += ["Pooled over folds (annomine/splits.py): " + "; ".join(
            f"fold {f['fold']}: {f['n_queries']} test queries, selected on the other half" for f in report["folds"])
            + ". " + report["split_role"] + ".", ""]
    elif report.get("fold") or report.get("rotation"):
        lines += [f"Rotation {report.get('rotation', 0)}, fold {report.get('fold', 0)} (annomine/splits.py: fold 1 swaps "
                  "dev and test; another rotation holds out another block of queries).", ""]
    lines += model_table(report)
    paired = comparison_table(report)
    if paired:
        lines += ["", "## Against the baselines, paired over the same queries", "",
                  "NDCG@10 against the better baseline, lowest-grade share against zero-shot MiniLM; the difference's "
                  "CI resamples queries, so it excludes 0 only when the model wins (or loses) on the same queries.", "",
                  *paired]
    if report.get("rotations"):  # pooled rotations: one judge per rotation, each checked on its own block
        for rotation, teacher in (report.get("teacher") or {}).items():
            lines += teacher_lines(teacher, rotation)
    else:
        lines += teacher_lines(report.get("teacher"))
    selection = report.get("selection", {}).get("segment_counts")
    lines += ["", f"## NDCG@10 (unjudged=0) by query segment", "", f"Segments: {report['segment_rule']}; "
              f"counts {report['segment_counts']}"
              + (f"; in the dev split that made every training-time choice: {selection}" if selection else "") + ".", ""]
    lines += _segment_table(report["models"], "ndcg@10")
    lines += ["", "## Lowest-grade share@10 by query segment", ""]
    lines += _segment_table(report["models"], "lowest_share@10", pct=True)
    inputs = report["inputs"]
    lines += ["", "## Inputs", ""]
    for key in ("products", "queries", "labels", "n_products", "n_queries_evaluated", "n_labels",
                "n_rejected_label_rows", "labels_for_unknown_products", "labelled_queries_not_in_queries_file"):
        if key in inputs:
            lines.append(f"- {key}: {inputs[key]}")
    for model in report["models"]:
        retrieval = model.get("retrieval", {})
        index = retrieval.get("index") or {}
        extra = ", ".join(f"{k}={v}" for k, v in index.items() if k.startswith("recall_vs_flat"))
        lines.append(f"- {model['label']}: {retrieval.get('retriever')}, embeddings {retrieval.get('how', '-')}"
                     + (f", {extra}" if extra else ""))
    if report.get("skipped_models"):
        lines.append(f"- skipped models: {report['skipped_models']}")
    if report.get("registration"):
        lines.append(f"- registration: {report['registration']}")
    if report.get("command"):
        lines += ["", "Command:", "", "```", report["command"], "```"]
    return "\n".join(lines) + "\n"


def plot_metrics(report: dict, path: Path) -> Path:
    """One panel per metric: bars per model for all queries and each segment, with CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = ["all"] + [s for s in SEGMENTS if any(s in m["metrics"] for m in report["models"])]
    models = report["models"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2), squeeze=False)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(groups))
    for ax, metric in zip(axes[0], METRICS):
        for i, model in enumerate(models):
            means, lows, highs = [], [], []
            for g in groups:
                est = model["metrics"].get(g, {}).get(metric) or {}
                mean = est.get("mean")
                means.append(np.nan if mean is None else mean)
                lows.append(0 if mean is None else mean - est["ci_low"])
                highs.append(0 if mean is None else est["ci_high"] - mean)
            ax.bar(x + (i - (len(models) - 1) / 2) * width, means, width, yerr=[lows, highs], capsize=2, label=model["label"])
        ax.set_xticks(x, groups)
        ax.set_title(SHORT[metric])
        if metric == "lowest_share@10":
            ax.set_ylim(bottom=0)  # small shares: let the axis zoom in
        else:
            ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7, loc="lower left")
    conf = int(round(report["bootstrap"]["confidence"] * 100))
    fig.suptitle(f"split {report['split']}: mean over queries, {conf}% bootstrap CI (segments by {report['segment_rule'].split(';')[0].split(' (')[0]})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grades(report: dict, path: Path) -> Path:
    """Share of top-10 positions per grade (and unjudged), one stacked bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    keys = list(models[0]["grade_distribution@10"]) if models else []
    colours = {"unjudged": "#bbbbbb"}
    palette = ["#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#1f77b4", "#9467bd"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(models) + 1.6))
    for row, model in enumerate(models):
        dist = model["grade_distribution@10"]
        total = max(1, sum(dist.values()))
        left = 0.0
        for j, key in enumerate(keys):
            share = dist.get(key, 0) / total
            ax.barh(row, share, left=left, color=colours.get(key, palette[j % len(palette)]),
                    label=(f"grade {key}" if key != "unjudged" else key) if row == 0 else None)
            left += share
    ax.set_yticks(range(len(models)), [m["label"] for m in models])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of top-10 positions")
    ax.legend(ncol=len(keys), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title(f"Grades of the top 10 (split {report['split']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_data_curve(report: dict, path: Path, metric: str = "ndcg@10") -> Path:
    """NDCG@10 (with its CI) against the number of judge-graded mined pairs each trained model kept;
    baselines as horizontal lines; models that also learned from human labels in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = iter(["#7f7f7f", "#bcbd22", "#17becf", "#8c564b"])
    trained = []
    for model in report["models"]:
        est = model["metrics"].get("all", {}).get(metric) or {}
        if est.get("mean") is None:
            continue
        spec = model.get("spec") or {}
        pairs = spec.get("training_pairs")
        if spec.get("baseline") or pairs is None:  # a baseline, or a model folder whose training data is unknown
            colour = next(colours, "#7f7f7f")
            what = "zero-shot" if spec.get("baseline") else "training data unknown"
            ax.axhline(est["mean"], ls="--", lw=1, color=colour, label=f"{model['label']} ({what})")
            ax.axhspan(est["ci_low"], est["ci_high"], color=colour, alpha=0.08)
        else:
            trained.append((model["label"], int(pairs.get("mined", 0)), int(pairs.get("human", 0)), est))
    for label, mined, human, est in trained:
        colour = "#d62728" if human else "#1f77b4"
        ax.errorbar([mined], [est["mean"]], yerr=[[est["mean"] - est["ci_low"]], [est["ci_high"] - est["mean"]]], fmt="o",
                    color=colour, capsize=3)
        ax.annotate(f"{label}" + (f" (+{human} human)" if human else ""), (mined, est["mean"]), fontsize=7,
                    textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("judge-graded mined pairs in the kept stages")
    ax.set_ylabel(SHORT.get(metric, metric))
    conf = int(round(report["bootstrap"]["confidence"] * 100))
    ax.set_title(f"split {report['split']} ({report['inputs']['n_queries_evaluated']} queries): {SHORT.get(metric, metric)}, "
                 f"{conf}% CI; red: also human labels", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name: `minilm/tail/ndcg_at_10`."""
    text = "/".join(parts).replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)[:250]


def log_to_mlflow(report: dict, files: list[Path], tracking_uri: str, experiment: str, run_name: str = "evaluate") -> str:
    """Log params, per-model/segment metrics and the report files; returns the run id."""
    import mlflow

    use_tracking_store(tracking_uri)
    mlflow.set_experiment(experiment)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.log_params({"split": report["split"], "models": ",".join(m["label"] for m in report["models"])[:500],
                           "index": report["index"], "n_queries": report["inputs"].get("n_queries_evaluated"),
                           "fold": report.get("fold", "pooled" if report.get("folds") else 0),
                           "segment_rule": report["segment_rule"][:250], "k": report["k"], "recall_k": report["recall_k"]})
        metrics = {}
        for model in report["models"]:
            for group, block in model["metrics"].items():
                for metric in METRICS:
                    est = block.get(metric) or {}
                    if est.get("mean") is not None:
                        metrics[metric_key(model["label"], group, metric)] = est["mean"]
                        metrics[metric_key(model["label"], group, metric + "_ci_low")] = est["ci_low"]
                        metrics[metric_key(model["label"], group, metric + "_ci_high")] = est["ci_high"]
            recall = (model.get("retrieval", {}).get("index") or {})
            for k, v in recall.items():
                if k.startswith("recall_vs_flat") and v is not None:
                    metrics[metric_key(model["label"], k)] = v
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="evaluation")
        return run.info.run_id
