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
