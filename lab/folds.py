"""Pool the test reports of the two folds (annomine/splits.py) into one report over every held-out query.

Fold 0 selects on the dev half and reports the test half; fold 1 the other way round. Each fold's
`report_test.json` holds one row per (model, query); pooling concatenates them, so every held-out query
is reported once, by a model whose stages, epochs and interpolation were chosen on the other half. The
models are matched by label (a variant trained in each fold has the same name in both); a label missing
from a fold is left out. Means, segment tables and the paired comparisons are computed afresh over the
pooled rows, with the same bootstrap as a single report.

`pool_rotations` does the same one level up: each rotation (annomine/splits.py) holds out another block of the
open labelled queries and trains its own judge and models without them; its pooled-folds report is one block of
rows, and pooling the rotations reports every open query held out in some rotation once.
"""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from annomine.errors import AnnomineError
from annomine.evaluation import metrics as metrics_lib
from annomine.registration import final_choice, registration_candidates
from annomine.splits import FOLDS


class FoldReportError(AnnomineError, ValueError):
    """The fold reports cannot be pooled (a fold missing, another split, queries reported twice)."""


def check_reports(reports: dict[int, dict]) -> None:
    """Every fold present, each a `test` report of its own fold, no query in two folds."""
    missing = [f for f in FOLDS if f not in reports]
    if missing:
        raise FoldReportError(f"no test report for fold(s) {missing}: run `annomine evaluate --set project.fold=N` first")
    for fold, report in sorted(reports.items()):
        if report.get("split") != "test":
            raise FoldReportError(f"fold {fold}: the report is of split {report.get('split')!r}; only test reports are pooled")
        if report.get("fold", 0) != fold:
            raise FoldReportError(f"fold {fold}: the report says it is fold {report.get('fold', 0)}")
    _check_disjoint(reports, "is in the test reports of folds {} and {}")


def _check_disjoint(reports: dict[int, dict], clash: str) -> None:
    """No query in the per-query rows of two reports; `clash` words the error with the two keys."""
    seen: dict[str, int] = {}
    for key, report in sorted(reports.items()):
        for row in report.get("per_query", []):
            other = seen.setdefault(str(row["query_id"]), key)
            if other != key:
                raise FoldReportError(f"query {row['query_id']!r} " + clash.format(other, key))


def pooled_rows(reports: dict[int, dict], key: str = "fold") -> tuple[pd.DataFrame, list[str], list[dict]]:
    """(per-query rows of the models every report has, with a `key` column (the fold, or the rotation); those
    labels in the first report's order; the labels left out, each with the reports (`key`s) that have it)."""
    labels = {k: [m["label"] for m in r["models"]] for k, r in reports.items()}
    common = [label for label in labels[min(labels)] if all(label in ls for ls in labels.values())]
    left_out = sorted({label for ls in labels.values() for label in ls} - set(common))
    skipped = [{"model": label, "reason": f"not in every {key}'s report",
                f"{key}s": [k for k, ls in sorted(labels.items()) if label in ls]} for label in left_out]
    frames = []
    for k, report in sorted(reports.items()):
        rows = pd.DataFrame(report["per_query"])
        rows = rows[rows["model"].isin(common)].copy()
        rows[key] = k
        frames.append(rows)
    return pd.concat(frames, ignore_index=True), common, skipped


REGISTERED = "registered"


def with_registered(report: dict, references: tuple[str, ...] = ()) -> dict:
    """A fold's report plus the list `annomine evaluate` registers for that fold (annomine/registration.py: the best
    dev NDCG@10 among the pipeline's two-towers, `best+ce` and `ranked`) under the label `registered`, its per-query
    rows those of the chosen list; `chosen` names it. Unchanged when no evaluated list can be registered."""
    specs = {m["label"]: SimpleNamespace(**m["spec"]) for m in report["models"]}
    candidates = registration_candidates(report, specs, references)
    if not candidates:
        return report
    chosen = final_choice(candidates)[2]
    model = {**chosen, "label": REGISTERED, "spec": {**chosen["spec"], "label": REGISTERED}, "chosen": chosen["label"]}
    rows = [{**r, "model": REGISTERED} for r in report["per_query"] if r["model"] == chosen["label"]]
    return {**report, "models": [*report["models"], model], "per_query": [*report["per_query"], *rows]}


def pool(reports: dict[int, dict], n_resamples: int, confidence: float, seed: int,
         also_against: tuple[str, ...] = ()) -> dict:
    """One report in the layout of a single fold's (markdown and plots read it the same way), with the list each
    fold registers pooled as `registered` (`with_registered`: the product's final output)."""
    check_reports(reports)
    reports = {fold: with_registered(report, also_against) for fold, report in reports.items()}
    rows, labels, skipped = pooled_rows(reports)
    report = _pooled_report(reports, rows, labels, skipped, "fold", "dev_ndcg@10", n_resamples, confidence, seed, also_against)
    for model in report["models"]:
        if model["label"] == REGISTERED:
            model["chosen_by_fold"] = {str(f): next(m["chosen"] for m in r["models"] if m["label"] == REGISTERED)
                                       for f, r in sorted(reports.items())}
    report.update({
        "split": "test (both folds)",
        "split_role": "every held-out query once, each reported by the model selected on the other half (annomine.splits)",
        "folds": [{"fold": f, "n_queries": int(rows.loc[rows["fold"] == f, "query_id"].nunique()),
                   "created_at": r.get("created_at"), "command": r.get("command"),
                   "selection": r.get("selection")} for f, r in sorted(reports.items())],
        "selection": {"split": "dev of each fold", "note": "each fold's test half was never used for its selection"},
        "teacher": reports[min(reports)].get("teacher"),
    })
    return report


def check_rotation_reports(reports: dict[int, dict]) -> None:
    """At least one rotation, each a pooled-folds report, no query reported by two rotations."""
    if not reports:
        raise FoldReportError("no rotation has pooled folds yet: run `python -m lab.pool --conf "
                              "lab/conf/crowdflower.yaml --set project.rotation=N` after both folds of rotation N")
    for rotation, report in sorted(reports.items()):
        if report.get("split") != "test (both folds)":
            raise FoldReportError(f"rotation {rotation}: the report is of split {report.get('split')!r}; "
                                  "only pooled-folds test reports are pooled")
    _check_disjoint(reports, "is held out in rotations {} and {}")


def pool_rotations(reports: dict[int, dict], n_resamples: int, confidence: float, seed: int,
                   also_against: tuple[str, ...] = (), missing: list[int] | None = None) -> dict:
    """Every rotation's pooled folds as one report (same layout); `missing`: rotations not yet run."""
    check_rotation_reports(reports)
    rows, labels, skipped = pooled_rows(reports, key="rotation")
    report = _pooled_report(reports, rows, labels, skipped, "rotation", "dev_ndcg@10_by_fold", n_resamples, confidence, seed,
                            also_against)
    for model in report["models"]:
        if model["label"] == REGISTERED:
            model["chosen_by_rotation"] = {str(r): next(m.get("chosen_by_fold") for m in rep["models"] if m["label"] == REGISTERED)
                                           for r, rep in sorted(reports.items())}
    report.update({
        "split": "test (every rotation, both folds)",
        "split_role": ("every open labelled query held out in some rotation once, each reported by a model selected on "
                       "the other half of its block, with a judge and training sets that never saw its block's labels "
                       "(annomine.splits)"),
        "rotations": [{"rotation": r, "n_queries": int(rows.loc[rows["rotation"] == r, "query_id"].nunique()),
                       "folds": rep.get("folds")} for r, rep in sorted(reports.items())],
        "rotations_missing": list(missing or []),
        "selection": {"split": "dev of each rotation's folds", "note": "no reported query was used for any selection"},
        "teacher": {str(r): rep.get("teacher") for r, rep in sorted(reports.items())},
    })
    return report


def _pooled_spec(specs: list[dict], keys: list[int], key: str) -> dict:
    """One model's spec over the pooled reports: the first report's, with what it was trained on as the mean over
    every model behind the pool (each fold or rotation trains its own on its own pairs; `trained_models` lists
    them) and each report's own figure beside it (`training_pairs_by_<key>`)."""
    spec = {k: v for k, v in specs[0].items() if not k.startswith("training_pairs_by_")}
    if spec.get("baseline"):
        return spec
    models = [m for s in specs for m in (s.get("trained_models") or [s.get("training_pairs")])]
    known = [m for m in models if m is not None]
    spec["training_pairs"] = ({source: int(round(sum(m.get(source, 0) for m in known) / len(known)))
                               for source in sorted({s for m in known for s in m})} if known else None)
    spec["trained_models"] = models
    spec[f"training_pairs_by_{key}"] = {str(k): s.get("training_pairs") for k, s in zip(keys, specs)}
    return spec


def _comparisons(rows: pd.DataFrame, models: list[dict], baselines: list[str], labels: list[str], n_resamples: int,
                 confidence: float, seed: int, also_against: tuple[str, ...]) -> list[dict]:
    """Against the baselines, then each ranked list against every other list."""
    found = metrics_lib.compare_to_baselines(rows, baselines, labels, n_resamples, confidence, seed, also_against=also_against)
    ranked = [m["label"] for m in models if m["spec"].get("kind") == "ranked"]
    return found + metrics_lib.ranked_comparisons(rows, ranked, labels, n_resamples, confidence, seed, known=found)


def _pooled_report(reports: dict[int, dict], rows: pd.DataFrame, labels: list[str], skipped: list[dict], key: str,
                   dev_field: str, n_resamples: int, confidence: float, seed: int, also_against: tuple[str, ...]) -> dict:
    """The fields a pooled report shares with a single one, computed afresh over the pooled per-query rows.
    `dev_field`: each pooled report's per-model dev figure (a fold report's `dev_ndcg@10`, a pooled-folds report's
    `dev_ndcg@10_by_fold`), kept per `key`."""
    segments = rows.drop_duplicates("query_id").set_index("query_id")["segment"]
    first = reports[min(reports)]
    by_label = {k: {m["label"]: m for m in r["models"]} for k, r in reports.items()}
    models = []
    for label in labels:
        mine = rows[rows["model"] == label]
        models.append({
            "label": label, "spec": _pooled_spec([by_label[k][label]["spec"] for k in sorted(reports)], sorted(reports), key),
            "retrieval": {f"by_{key}": {str(k): by_label[k][label].get("retrieval") for k in sorted(reports)}},
            "metrics": metrics_lib.summarise(mine, segments, n_resamples, confidence, seed),
            "dev_ndcg@10": None,
            f"dev_ndcg@10_by_{key}": {str(k): by_label[k][label].get(dev_field) for k in sorted(reports)},
            "grade_distribution@10": metrics_lib.grade_distribution(mine, first["grade_scale"]["min"], first["grade_scale"]["max"]),
        })
    baselines = [m["label"] for m in models if m["spec"].get("baseline")]
    n_queries = int(rows["query_id"].nunique())
    return {
        "created_at": pd.Timestamp.now("UTC").isoformat(),
        "k": first["k"], "recall_k": first["recall_k"], "index": first["index"], "grade_scale": first["grade_scale"],
        "metrics": first["metrics"],
        "bootstrap": {"resamples": n_resamples, "confidence": confidence, "seed": seed},
        "segment_rule": first["segment_rule"],
        "segment_counts": {s: int((segments == s).sum()) for s in metrics_lib.SEGMENTS},
        "inputs": {**{k: first["inputs"].get(k) for k in ("products", "queries", "labels", "n_products")},
                   "n_queries_evaluated": n_queries, "n_labels": sum(r["inputs"].get("n_labels", 0) for r in reports.values())},
        "models": models, "skipped_models": skipped,
        "per_query": rows.to_dict("records"),
        "comparisons": _comparisons(rows, models, baselines, labels, n_resamples, confidence, seed, also_against),
    }
