"""The LambdaMART ranker: LightGBM's `lambdarank` objective over the candidates of each query.

A `Ranker` is a LightGBM booster plus the feature columns it was fitted on; it is saved as LightGBM's own text
model (`<name>.txt`) with a JSON side file (`<name>.json`: columns, label choice, gains, parameters).

A ranker may start from a score instead of zero (`START_COLUMNS`): started from the tier-1 cross-encoder's expected
grade (`ce`), its trees learn corrections to the cross-encoder's order rather than an order of their own, and the
score is that column plus the trees' sum.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


# What a ranker's score starts from: zero (plain LambdaMART) or a feature column.
START_COLUMNS = {"zero": None, "ce": "ce_expected"}


def start_scores(frame: pd.DataFrame, start: str) -> np.ndarray | None:
    """The starting score of each row (None: zero)."""
    column = START_COLUMNS[start]
    if column is None:
        return None
    if column not in frame.columns:
        raise ValueError(f"a ranker started from {start!r} needs the feature column {column!r}")
    return frame[column].to_numpy(dtype=float)


@dataclass
class RankerParams:
    n_estimators: int = 200
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_child_samples: int = 20
    # Rows and columns sampled per tree (1.0: all).
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    # NDCG position lambdarank optimises (the evaluation's cut-off).
    truncation_level: int = 10
    # LightGBM threads of one fit, and how many label choices are fitted at once (LightGBM releases the GIL; each
    # fit keeps `threads`, so the rankers are those of fits made one at a time).
    threads: int = 2
    fits_at_once: int = 2

    def validate(self) -> None:
        if self.n_estimators < 1 or self.num_leaves < 2 or self.min_child_samples < 1 or self.fits_at_once < 1:
            raise ValueError("n_estimators >= 1, num_leaves >= 2, min_child_samples >= 1 and fits_at_once >= 1 are "
                             "required")
        if not 0 < self.learning_rate <= 1 or not 0 < self.subsample <= 1 or not 0 < self.colsample_bytree <= 1:
            raise ValueError("learning_rate, subsample and colsample_bytree must be in (0, 1]")


@dataclass
class Ranker:
    booster: object
    columns: list[str]
    info: dict = field(default_factory=dict)

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        if not len(frame):
            return np.zeros(0)
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"the feature frame lacks the ranker's column(s) {missing}")
        scores = np.asarray(self.booster.predict(frame[self.columns].to_numpy(dtype=float)), dtype=float)
        start = start_scores(frame, self.start)
        return scores if start is None else scores + start

    @property
    def start(self) -> str:
        return (self.info.get("label") or {}).get("start") or "zero"

    def importance(self) -> dict[str, float]:
        """Total gain per feature."""
        gains = self.booster.feature_importance(importance_type="gain")
        return {c: float(g) for c, g in zip(self.columns, gains)}

    def save(self, folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(folder / f"{name}.txt"))
        (folder / f"{name}.json").write_text(json.dumps({"columns": self.columns, **self.info}, indent=2, default=str))
        return folder / f"{name}.txt"

    @classmethod
    def load(cls, folder: Path, name: str) -> "Ranker":
        import lightgbm

        meta = json.loads((folder / f"{name}.json").read_text())
        booster = lightgbm.Booster(model_file=str(folder / f"{name}.txt"))
        return cls(booster, list(meta.pop("columns")), meta)


def group_sizes(query_ids: pd.Series) -> list[int]:
    """Rows per query, in order of appearance; the rows of a query must be contiguous."""
    ids = query_ids.astype(str).to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    if len(starts) != len(set(ids)):
        raise ValueError("the rows of each query must be contiguous")
    return np.diff(np.r_[starts, len(ids)]).tolist()


def fit_ranker(frame: pd.DataFrame, columns: list[str], levels: np.ndarray, gains: list[float], params: RankerParams,
               seed: int, info: dict | None = None, start: str = "zero") -> Ranker:
    """Fit LambdaMART on `frame`'s `columns` with integer relevance `levels` and a gain per level, its score starting
    from `start` (START_COLUMNS)."""
    import lightgbm

    model = lightgbm.LGBMRanker(
        objective="lambdarank", n_estimators=params.n_estimators, learning_rate=params.learning_rate,
        num_leaves=params.num_leaves, min_child_samples=params.min_child_samples, subsample=params.subsample,
        subsample_freq=1 if params.subsample < 1 else 0, colsample_bytree=params.colsample_bytree,
        reg_lambda=params.reg_lambda, label_gain=list(gains), lambdarank_truncation_level=params.truncation_level,
        random_state=seed, n_jobs=params.threads, verbose=-1)
    model.fit(frame[columns].to_numpy(dtype=float), np.asarray(levels, dtype=int), group=group_sizes(frame["query_id"]),
              init_score=start_scores(frame, start))
    return Ranker(model.booster_, list(columns), dict(info or {}, params=asdict(params)))


def rerank(frame: pd.DataFrame, scores: np.ndarray, k: int | None = None) -> dict[str, list[str]]:
    """query_id -> product ids by descending score (ties keep the frame's order), at most k."""
    ranked = frame[["query_id", "product_id"]].assign(score=scores, order=np.arange(len(frame)))
    ranked = ranked.sort_values(["query_id", "score", "order"], ascending=[True, False, True], kind="stable")
    return {q: rows["product_id"].tolist()[:k] for q, rows in ranked.groupby("query_id", sort=False)}
