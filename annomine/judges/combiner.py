"""Combine the evidence of every tier a pair consulted: a calibrated model over their grade distributions.

For a cascade path (the tiers an escalated pair consulted, e.g. `tier1+tier2`), a multinomial
logistic regression over the concatenated log grade distributions of those tiers predicts the human
grade. It is fitted by `annomine judge calibrate` on the human calibration pairs the LLM tiers graded
(the ones the first tier is least sure of: those are what escalates) and **kept only when it beats
the first tier alone on those pairs**, out-of-fold by query (folds of whole queries: no query is
scored by a model that saw it), by at least `min_gain` quadratic weighted kappa. A weak LLM (one that
answers 4 to everything) adds no information, so its combination does not beat tier 1 and is dropped:
the first tier decides. A strong one raises the out-of-fold kappa and is used. Without a kept
combination for a pair's path, the first tier's grade stands (its distribution is the only evidence
that was shown to be calibrated on human grades).

A tier without a distribution (no log-probabilities) contributes its grade with `raw_confidence`
and the rest spread evenly over the other grades. Pure numpy / scikit-learn; saved as JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FLOOR = 1e-3  # probabilities are floored before the log: a 0 from a missing top alternative is not -inf


def distribution(result, grades: list[int]) -> np.ndarray:
    """A tier result's grade distribution (probs, else its grade at raw_confidence and the rest spread evenly)."""
    k = len(grades)
    probs = getattr(result, "probs", None) if not isinstance(result, dict) else result.get("probs")
    if probs:
        v = np.array([float(probs.get(g, probs.get(str(g), 0.0))) for g in grades], dtype=float)
        if v.sum() > 0:
            return v / v.sum()
    grade = result.get("grade") if isinstance(result, dict) else result.grade
    conf = result.get("raw_confidence") if isinstance(result, dict) else result.raw_confidence
    conf = 1.0 / k if conf is None else min(max(float(conf), 0.0), 1.0)
    v = np.full(k, (1.0 - conf) / max(k - 1, 1))
    v[grades.index(int(grade))] = conf
    return v


def features(dists: list[np.ndarray]) -> np.ndarray:
    """Concatenated floored log-distributions, one block per tier of the path (rows = pairs)."""
    return np.concatenate([np.log(np.clip(np.atleast_2d(d), FLOOR, 1.0)) for d in dists], axis=1)


@dataclass
class Combination:
    """One path's fitted logistic regression (classes = the grades it saw)."""

    tiers: list[str]
    classes: list[int]
    coef: list[list[float]]
    intercept: list[float]
    stats: dict = field(default_factory=dict)

    def predict_proba(self, dists: list[np.ndarray], grades: list[int]) -> np.ndarray:
        x = features(dists)
        coef, icpt = np.asarray(self.coef, float), np.asarray(self.intercept, float)
        if coef.shape[0] == 1:  # binary logistic regression: one row for the second class
            z = x @ coef[0] + icpt[0]
            p_cls = np.stack([1.0 / (1.0 + np.exp(z)), 1.0 / (1.0 + np.exp(-z))], axis=1)
        else:
            logits = x @ coef.T + icpt
            logits -= logits.max(axis=1, keepdims=True)
            p_cls = np.exp(logits)
            p_cls /= p_cls.sum(axis=1, keepdims=True)
        out = np.zeros((len(x), len(grades)))
        for j, c in enumerate(self.classes):
            out[:, grades.index(int(c))] = p_cls[:, j]
        return out

    def to_dict(self) -> dict:
        return {"tiers": self.tiers, "classes": self.classes, "coef": self.coef, "intercept": self.intercept, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict) -> "Combination":
        return cls(list(d["tiers"]), [int(c) for c in d["classes"]], d["coef"], d["intercept"], d.get("stats", {}))


@dataclass
class Combiner:
    """The kept combinations by path ('tier1+tier2'), and the fit report (kept or not, and why)."""

    grades: list[int]
    identity: dict
    paths: dict[str, Combination] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def for_path(self, tiers: list[str]) -> Combination | None:
        return self.paths.get("+".join(tiers))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps({k: v.to_dict() for k, v in sorted(self.paths.items())}, sort_keys=True,
                                         default=float).encode()).hexdigest()[:10]

    def to_dict(self) -> dict:
        return {"grades": self.grades, "identity": self.identity, "paths": {k: v.to_dict() for k, v in self.paths.items()},
                "report": self.report}

    @classmethod
    def from_dict(cls, d: dict) -> "Combiner":
        return cls([int(g) for g in d["grades"]], d.get("identity", {}),
                   {k: Combination.from_dict(v) for k, v in d.get("paths", {}).items()}, d.get("report", {}))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=float))

    @classmethod
    def load(cls, path: str | Path) -> "Combiner":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _fit_lr(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000).fit(x, y)


def fit_path(dists: list[np.ndarray], baseline_grade: np.ndarray, truth: np.ndarray, groups: np.ndarray, tiers: list[str],
             grades: list[int], folds: int = 4, seed: int = 13, c: float = 1.0, min_gain: float = 0.01,
             min_pairs: int = 30) -> tuple[Combination | None, dict]:
    """Fit one path's combination; (it, report) when it beats the first tier out-of-fold by query, else (None, report)."""
    from annomine.judges.calibration import query_folds
    from annomine.judges.data import grading_metrics

    truth = np.asarray(truth).astype(int)
    baseline_grade = np.asarray(baseline_grade).astype(int)
    x = features(dists)
    n = len(truth)
    base = grading_metrics(truth, list(baseline_grade), grades)
    report = {"path": "+".join(tiers), "pairs": int(n), "queries": int(len(np.unique(groups))),
              "first_tier": {"quadratic_weighted_kappa": base["quadratic_weighted_kappa"], "exact_agreement": base["exact_agreement"]},
              "scored": "out-of-fold by query", "min_gain": min_gain}
    if n < min_pairs or len(np.unique(truth)) < 2 or len(np.unique(groups)) < 2:
        report.update(kept=False, reason=f"too few pairs to fit and score ({n} pairs, {len(np.unique(truth))} grades, "
                                         f"{len(np.unique(groups))} queries; need {min_pairs}, 2, 2)")
        return None, report
    fold = query_folds(groups, folds, seed)
    oof = baseline_grade.copy()
    for k in np.unique(fold):
        test = fold == k
        train = ~test
        if len(np.unique(truth[train])) < 2:
            continue  # that fold keeps the first tier's grades
        model = _fit_lr(x[train], truth[train], c)
        oof[test] = model.classes_[np.argmax(model.predict_proba(x[test]), axis=1)]
    comb = grading_metrics(truth, list(oof), grades)
    report["combined"] = {"quadratic_weighted_kappa": comb["quadratic_weighted_kappa"], "exact_agreement": comb["exact_agreement"]}
    gain = comb["quadratic_weighted_kappa"] - base["quadratic_weighted_kappa"]
    report["qwk_gain"] = gain
    if not np.isfinite(gain) or gain < min_gain:
        report.update(kept=False, reason=f"does not beat {tiers[0]} alone out-of-fold (QWK {comb['quadratic_weighted_kappa']:.3f} "
                                         f"vs {base['quadratic_weighted_kappa']:.3f}, needs +{min_gain:g}): {tiers[0]} decides")
        return None, report
    model = _fit_lr(x, truth, c)
    report.update(kept=True, reason=f"beats {tiers[0]} alone out-of-fold (QWK {comb['quadratic_weighted_kappa']:.3f} vs "
                                    f"{base['quadratic_weighted_kappa']:.3f})")
    return Combination(list(tiers), [int(v) for v in model.classes_], model.coef_.tolist(), model.intercept_.tolist(), report), report
