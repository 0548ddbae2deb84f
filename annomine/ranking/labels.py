"""Relevance labels for the ranker: the judge's raw grade, its sigmoid-polarized expected grade, human grades.

LightGBM's lambdarank takes integer relevance levels and a gain per level (`label_gain`). Every choice here
uses a gain proportional to relevance, as the evaluation's NDCG does (gain = grade - min_grade):
- `raw`: level = judge grade - min_grade, gain = level;
- `polarized`: the judge's expected grade e, scaled to x = (e - min_grade) / (max_grade - min_grade), through
  the sigmoid s = 1 / (1 + exp(-steepness * (x - centre))), which pushes moderate scores toward 0 or 1; the
  level is s quantised to `POLARIZED_LEVELS` steps and the gain is the level (so gain is proportional to s);
- `human`: the human grade where the pair has one, else the judge's grade (as `raw`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LABEL_CHOICES = ("raw", "polarized", "human")
POLARIZED_LEVELS = 30


def polarize(expected, min_grade: int, max_grade: int, steepness: float, centre: float) -> np.ndarray:
    """The sigmoid of the expected grade scaled to [0, 1]: 1 / (1 + exp(-steepness * (x - centre)))."""
    if max_grade <= min_grade:
        raise ValueError(f"max_grade ({max_grade}) must exceed min_grade ({min_grade})")
    x = (np.asarray(expected, dtype=float) - min_grade) / (max_grade - min_grade)
    return 1.0 / (1.0 + np.exp(-float(steepness) * (x - float(centre))))


def quantise(values, levels: int = POLARIZED_LEVELS) -> np.ndarray:
    """Values in [0, 1] as integer levels 0..levels (nearest)."""
    return np.clip(np.rint(np.asarray(values, dtype=float) * levels), 0, levels).astype(int)


def relevance(frame: pd.DataFrame, choice: str, min_grade: int, max_grade: int, steepness: float | None = None,
              centre: float | None = None) -> tuple[np.ndarray, list[float]]:
    """(integer level per row, gain per level) for `choice`. `frame` has `judge_grade`, `judge_expected` and, for
    `human`, `human_grade` (null where the pair has no human label)."""
    span = max_grade - min_grade
    if choice == "raw":
        return _grade_levels(frame["judge_grade"], min_grade, max_grade), [float(g) for g in range(span + 1)]
    if choice == "human":
        grade = frame["human_grade"].where(frame["human_grade"].notna(), frame["judge_grade"])
        return _grade_levels(grade, min_grade, max_grade), [float(g) for g in range(span + 1)]
    if choice == "polarized":
        if steepness is None or centre is None:
            raise ValueError("the polarized label needs a steepness and a centre")
        s = polarize(frame["judge_expected"], min_grade, max_grade, steepness, centre)
        return quantise(s), [float(g) for g in range(POLARIZED_LEVELS + 1)]
    raise ValueError(f"unknown label choice {choice!r}; use one of {list(LABEL_CHOICES)}")


def _grade_levels(grade: pd.Series, min_grade: int, max_grade: int) -> np.ndarray:
    values = pd.to_numeric(grade, errors="coerce")
    if values.isna().any():
        raise ValueError(f"{int(values.isna().sum())} candidate(s) without a grade")
    return (np.clip(np.rint(values.to_numpy(dtype=float)), min_grade, max_grade) - min_grade).astype(int)
