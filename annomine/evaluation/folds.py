"""Pool the test reports of the two folds (annomine/splits.py) into one report over every held-out query.

Fold 0 selects on the dev half and reports the test half; fold 1 the other way round. Each fold's
`report_test.json` holds one row per (model, query); pooling concatenates them, so every held-out query
is reported once, by a model whose stages, epochs and interpolation were chosen on the other half. The
models are matched by label (a variant trained in each fold has the same name in both); a label missing
from a fold is left out. Means, segment tables and the paired comparisons are computed afresh over the
pooled rows, with the same bootstrap as a single report.
"""

from __future__ import annotations

import pandas as pd

from annomine.evaluation import metrics as metrics_lib
from annomine.splits import FOLDS


class FoldReportError(ValueError):
    """The fold reports cannot be pooled (a fold missing, another split, queries reported twice)."""


def check_reports(reports: dict[int, dict]) -> None:
    """Every fold present, each a `test` report of its own fold, no query in two folds."""
    missing = [f for f in FOLDS if f not in reports]
    if missing:
        raise FoldReportError(f"no test report for fold(s) {missing}: run `annomine evaluate --set project.fold=N` first")
    seen: dict[str, int] = {}
    for fold, report in sorted(reports.items()):
        if report.get("split") != "test":
            raise FoldReportError(f"fold {fold}: the report is of split {report.get('split')!r}; only test reports are pooled")
        if report.get("fold", 0) != fold:
            raise FoldReportError(f"fold {fold}: the report says it is fold {report.get('fold', 0)}")
        for row in report.get("per_query", []):
            other = seen.setdefault(str(row["query_id"]), fold)
            if other != fold:
                raise FoldReportError(f"query {row['query_id']!r} is in the test reports of folds {other} and {fold}")


def pooled_rows(reports: dict[int, dict]) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """(per-query rows of the models every fold has, with a `fold` column; those labels in fold 0's order;
    the labels left out, each with the folds that have it)."""
    labels = {fold: [m["label"] for m in r["models"]] for fold, r in reports.items()}
    common = [label for label in labels[min(labels)] if all(label in ls for ls in labels.values())]
    left_out = sorted({label for ls in labels.values() for label in ls} - set(common))
    skipped = [{"model": label, "reason": "not in every fold's report",
                "folds": [f for f, ls in sorted(labels.items()) if label in ls]} for label in left_out]
    frames = []
    for fold, report in sorted(reports.items()):
        rows = pd.DataFrame(report["per_query"])
        rows = rows[rows["model"].isin(common)].copy()
        rows["fold"] = fold
        frames.append(rows)
    return pd.concat(frames, ignore_index=True), common, skipped


def pool(reports: dict[int, dict], n_resamples: int, confidence: float, seed: int,
         also_against: tuple[str, ...] = ()) -> dict:
    """One report in the layout of a single fold's (markdown and plots read it the same way)."""
    check_reports(reports)
    rows, labels, skipped = pooled_rows(reports)
    segments = rows.drop_duplicates("query_id").set_index("query_id")["segment"]
    first = reports[min(reports)]
    by_label = {fold: {m["label"]: m for m in r["models"]} for fold, r in reports.items()}
    models = []
    for label in labels:
        mine = rows[rows["model"] == label]
        models.append({
            "label": label, "spec": by_label[0][label]["spec"],
            "retrieval": {"by_fold": {str(f): by_label[f][label].get("retrieval") for f in sorted(reports)}},
            "metrics": metrics_lib.summarise(mine, segments, n_resamples, confidence, seed),
            "dev_ndcg@10": None,
            "dev_ndcg@10_by_fold": {str(f): by_label[f][label].get("dev_ndcg@10") for f in sorted(reports)},
            "grade_distribution@10": metrics_lib.grade_distribution(mine, first["grade_scale"]["min"], first["grade_scale"]["max"]),
        })
    baselines = [m["label"] for m in models if m["spec"].get("baseline")]
    n_queries = int(rows["query_id"].nunique())
    return {
        "created_at": pd.Timestamp.now("UTC").isoformat(),
        "split": "test (both folds)",
        "split_role": "every held-out query once, each reported by the model selected on the other half (annomine.splits)",
        "folds": [{"fold": f, "n_queries": int(rows.loc[rows["fold"] == f, "query_id"].nunique()),
                   "created_at": r.get("created_at"), "command": r.get("command"),
                   "selection": r.get("selection")} for f, r in sorted(reports.items())],
        "selection": {"split": "dev of each fold", "note": "each fold's test half was never used for its selection"},
        "k": first["k"], "recall_k": first["recall_k"], "index": first["index"], "grade_scale": first["grade_scale"],
        "metrics": first["metrics"],
        "bootstrap": {"resamples": n_resamples, "confidence": confidence, "seed": seed},
        "segment_rule": first["segment_rule"],
        "segment_counts": {s: int((segments == s).sum()) for s in metrics_lib.SEGMENTS},
        "inputs": {**{k: first["inputs"].get(k) for k in ("products", "queries", "labels", "n_products")},
                   "n_queries_evaluated": n_queries, "n_labels": sum(r["inputs"].get("n_labels", 0) for r in reports.values())},
        "teacher": first.get("teacher"),
        "models": models, "skipped_models": skipped,
        "per_query": rows.to_dict("records"),
        "comparisons": metrics_lib.compare_to_baselines(rows, baselines, labels, n_resamples, confidence, seed,
                                                        also_against=also_against),
    }
