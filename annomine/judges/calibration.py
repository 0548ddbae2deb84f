"""Per-class isotonic calibration of a tier's confidence, and per-class escalation thresholds.

For each predicted grade `c`, an isotonic regression maps the tier's raw confidence (e.g. its
probability of `c`) to the probability that the human grade is `c`, fitted on a human-labelled,
query-disjoint calibration split. A class with too few calibration examples falls back to one
isotonic fit over all classes. The threshold of class `c` is the lowest calibrated confidence
such that, on the calibration split, the pairs predicted `c` at or above it agree with humans at
least `target_agreement` of the time; below it the pair escalates. A class that never reaches the
target has threshold > 1 (always escalate). Pure numpy/scikit-learn, JSON-serialisable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NEVER = 1.01  # threshold of a class that never reaches the target: always escalate


def _fit_isotonic(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    iso.fit(x, y)
    return [float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_]


def _apply(curve: tuple[list[float], list[float]], x: np.ndarray) -> np.ndarray:
    xs, ys = curve
    if len(xs) == 0:
        return np.asarray(x, dtype=float)
    if len(xs) == 1:
        return np.full(len(x), ys[0], dtype=float)
    return np.interp(np.asarray(x, dtype=float), xs, ys)


def _threshold(conf: np.ndarray, correct: np.ndarray, target: float, min_support: int) -> float:
    """Lowest t with agreement(conf >= t) >= target over at least min_support pairs."""
    if len(conf) == 0:
        return NEVER
    order = np.argsort(-conf, kind="stable")
    c, ok = conf[order], correct[order].astype(float)
    running = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    best = NEVER
    for i in range(len(c)):
        # only cut between distinct confidence values
        if i + 1 < len(c) and c[i + 1] == c[i]:
            continue
        if i + 1 >= min_support and running[i] >= target:
            best = float(c[i])
    return best


@dataclass
class Calibrator:
    grades: list[int]
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # str(grade) or "all"
    thresholds: dict[str, float] = field(default_factory=dict)
    target_agreement: float = 0.9
    stats: dict = field(default_factory=dict)

    def calibrate(self, pred: np.ndarray, raw_conf: np.ndarray) -> np.ndarray:
        pred = np.asarray(pred)
        raw = np.asarray(raw_conf, dtype=float)
        out = np.zeros(len(pred), dtype=float)
        for g in np.unique(pred):
            mask = pred == g
            curve = self.curves.get(str(int(g))) or self.curves.get("all")
            out[mask] = _apply(curve, raw[mask]) if curve else raw[mask]
        return out

    def threshold(self, grade: int) -> float:
        return float(self.thresholds.get(str(int(grade)), self.thresholds.get("all", NEVER)))

    def is_sure(self, pred: np.ndarray, conf: np.ndarray) -> np.ndarray:
        return np.array([c >= self.threshold(g) for g, c in zip(pred, conf)], dtype=bool)

    def to_dict(self) -> dict:
        return {"grades": self.grades, "curves": self.curves, "thresholds": self.thresholds,
                "target_agreement": self.target_agreement, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        curves = {k: (list(v[0]), list(v[1])) for k, v in d.get("curves", {}).items()}
        return cls(list(d["grades"]), curves, {k: float(v) for k, v in d.get("thresholds", {}).items()},
                   float(d.get("target_agreement", 0.9)), d.get("stats", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Calibrator":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def uncalibrated(cls, grades: list[int], threshold: float) -> "Calibrator":
        """Identity curves and one threshold for every class (a tier nobody calibrated yet)."""
        return cls(list(grades), {}, {"all": float(threshold)}, float("nan"), {"uncalibrated": True})


def fit_calibrator(pred, raw_conf, truth, grades: list[int], target_agreement: float = 0.9,
                   min_class_samples: int = 20, min_support: int = 5) -> Calibrator:
    """Fit per-class isotonic curves and thresholds on a human-labelled calibration split."""
    pred = np.asarray(pred).astype(int)
    raw = np.asarray(raw_conf, dtype=float)
    truth = np.asarray(truth).astype(int)
    correct = (pred == truth).astype(float)
    if len(pred) == 0:
        raise ValueError("calibration split is empty: no human-labelled pairs to calibrate on")
    cal = Calibrator(list(grades), target_agreement=target_agreement)
    cal.curves["all"] = _fit_isotonic(raw, correct)
    stats = {}
    for g in grades:
        mask = pred == g
        n = int(mask.sum())
        if n >= min_class_samples and 0 < correct[mask].sum() < n:
            cal.curves[str(g)] = _fit_isotonic(raw[mask], correct[mask])
        stats[str(g)] = {"n": n, "agreement": float(correct[mask].mean()) if n else None,
                         "own_curve": str(g) in cal.curves}
    conf = cal.calibrate(pred, raw)
    for g in grades:
        mask = pred == g
        cal.thresholds[str(g)] = _threshold(conf[mask], correct[mask], target_agreement, min_support)
        sure = conf[mask] >= cal.thresholds[str(g)]
        stats[str(g)].update(threshold=cal.thresholds[str(g)], sure_share=float(sure.mean()) if mask.any() else None,
                             sure_agreement=float(correct[mask][sure].mean()) if sure.any() else None)
    cal.thresholds["all"] = _threshold(conf, correct, target_agreement, min_support)
    sure = cal.is_sure(pred, conf)
    cal.stats = {"per_class": stats, "n": int(len(pred)), "agreement": float(correct.mean()),
                 "sure_share": float(sure.mean()), "sure_agreement": float(correct[sure].mean()) if sure.any() else None}
    return cal


# ---- cut-points on the expected grade ---------------------------------------------------------
def apply_cutpoints(scores, cutpoints, grades: list[int]) -> np.ndarray:
    """Grade `grades[k]` where k = the number of cut-points at or below the score (cut-points ascending)."""
    cuts = np.sort(np.asarray(cutpoints, dtype=float))
    if len(cuts) != len(grades) - 1:
        raise ValueError(f"{len(grades)} grades need {len(grades) - 1} cut-points, got {len(cuts)}")
    return np.asarray(grades)[np.searchsorted(cuts, np.asarray(scores, dtype=float), side="right")]


def _kappa_exact(truth_idx: np.ndarray, pred_idx: np.ndarray, k: int) -> tuple[float, float]:
    """(quadratic weighted kappa, exact agreement) from class indices; fast, for the cut-point search."""
    m = np.bincount(truth_idx * k + pred_idx, minlength=k * k).reshape(k, k).astype(float)
    n = m.sum()
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    expected = np.outer(m.sum(1), m.sum(0)) / max(n, 1.0)
    denom = (w * expected).sum()
    kappa = 1.0 - (w * m).sum() / denom if denom > 0 else 0.0
    return float(kappa), float(np.trace(m) / max(n, 1.0))


def cutpoint_objective(truth, pred, grades: list[int], objective: str = "qwk") -> float:
    """What the cut-points maximise: `qwk`, `exact`, or `qwk+exact` (their sum)."""
    index = {g: i for i, g in enumerate(grades)}
    t = np.array([index[int(g)] for g in truth])
    p = np.array([index[int(g)] for g in pred])
    kappa, exact = _kappa_exact(t, p, len(grades))
    return {"qwk": kappa, "exact": exact, "qwk+exact": kappa + exact}[objective]


def fit_cutpoints(scores, truth, grades: list[int], objective: str = "qwk", rounds: int = 8,
                  n_candidates: int = 200) -> list[float]:
    """Cut-points on a score (the expected grade) that maximise `objective` on labelled pairs.

    Coordinate search: starting at the midpoints between grades, each cut-point in turn moves to the
    best of up to `n_candidates` score quantiles between its neighbours, until a round changes nothing.
    Ties keep the cut-point nearest the midpoint start (stable under small data changes).
    """
    scores = np.asarray(scores, dtype=float)
    truth = np.asarray(truth).astype(int)
    if len(scores) == 0:
        raise ValueError("no labelled pairs to fit cut-points on")
    index = {g: i for i, g in enumerate(grades)}
    t = np.array([index[int(g)] for g in truth])
    k = len(grades)
    cuts = np.array([(grades[i] + grades[i + 1]) / 2.0 for i in range(k - 1)], dtype=float)
    qs = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, n_candidates)))
    cand_all = np.unique(np.concatenate([(qs[:-1] + qs[1:]) / 2.0, cuts, [scores.min() - 1e-6, scores.max() + 1e-6]]))

    def value(c: np.ndarray) -> float:
        kappa, exact = _kappa_exact(t, np.searchsorted(c, scores, side="right"), k)
        return {"qwk": kappa, "exact": exact, "qwk+exact": kappa + exact}[objective]

    best = value(cuts)
    for _ in range(rounds):
        changed = False
        for j in range(k - 1):
            lo = cuts[j - 1] if j > 0 else -np.inf
            hi = cuts[j + 1] if j + 1 < k - 1 else np.inf
            cands = cand_all[(cand_all >= lo) & (cand_all <= hi)]
            start = (grades[j] + grades[j + 1]) / 2.0
            for c in cands[np.argsort(np.abs(cands - start), kind="stable")]:
                trial = cuts.copy()
                trial[j] = c
                v = value(trial)
                if v > best + 1e-12:
                    best, cuts, changed = v, trial, True
        if not changed:
            break
    return [float(c) for c in cuts]


def query_folds(groups, folds: int = 4, seed: int = 13) -> np.ndarray:
    """Fold number per row, whole groups (queries) to a fold: a seeded shuffle of the groups, dealt round-robin
    into `folds` folds (at least 2, at most one per group)."""
    groups = np.asarray(groups).astype(str)
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(uniq[rng.permutation(len(uniq))], np.arange(len(uniq)) % max(2, min(folds, len(uniq)))))
    return np.array([fold_of[g] for g in groups])


def cross_validated_cutpoints(scores, truth, groups, grades: list[int], objective: str = "qwk", folds: int = 4,
                              seed: int = 13) -> np.ndarray:
    """Out-of-fold grades: cut-points fitted on the other folds' groups (queries), applied to each fold.
    An honest estimate of what fitted cut-points give on unseen queries."""
    scores = np.asarray(scores, dtype=float)
    truth = np.asarray(truth).astype(int)
    f = query_folds(groups, folds, seed)
    out = np.zeros(len(scores), dtype=int)
    for k in np.unique(f):
        test = f == k
        cuts = fit_cutpoints(scores[~test], truth[~test], grades, objective)
        out[test] = apply_cutpoints(scores[test], cuts, grades)
    return out
