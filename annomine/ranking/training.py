"""Fitting the ranker: labels on the train queries' candidates, one fit per label choice, selection on dev.

Pure functions over pandas frames: the feature frame (`annomine.ranking.features.build_features`), the judge's
annotations and the human labels go in; rankers and the dev figures that chose among them come out.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from annomine.evaluation.metrics import per_query_metrics
from annomine.ranking.labels import relevance
from annomine.ranking.model import Ranker, RankerParams, fit_ranker, rerank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelChoice:
    label: str  # raw | polarized | human
    steepness: float | None = None
    centre: float | None = None
    start: str = "zero"  # what the score starts from (annomine.ranking.model.START_COLUMNS)

    @property
    def name(self) -> str:
        name = f"polarized(steepness={self.steepness:g},centre={self.centre:g})" if self.label == "polarized" else self.label
        return name if self.start == "zero" else f"{name} from {self.start}"

    def as_dict(self) -> dict:
        return {"label": self.label, "steepness": self.steepness, "centre": self.centre, "start": self.start}


def label_choices(labels: list[str], steepness: list[float], centres: list[float],
                  starts: tuple[str, ...] = ("zero",)) -> list[LabelChoice]:
    """Every choice to compare on dev: each plain label once, `polarized` once per (steepness, centre), each from
    every start."""
    out = []
    for start in starts:
        for label in labels:
            if label == "polarized":
                out += [LabelChoice(label, float(s), float(c), start) for s in steepness for c in centres]
            else:
                out.append(LabelChoice(label, start=start))
    return out


def deciding_expected(tier_outputs: str | None, deciding_tier: str | None) -> float:
    """The expected grade the deciding tier recorded for a pair (NaN when not recorded)."""
    try:
        outputs = json.loads(tier_outputs or "{}")
    except ValueError:
        return math.nan
    value = (outputs.get(deciding_tier or "") or {}).get("expected_grade")
    return float(value) if value is not None else math.nan


def attach_targets(frame: pd.DataFrame, tier1_grades: np.ndarray, annotations: pd.DataFrame | None,
                   human: pd.DataFrame | None) -> pd.DataFrame:
    """`frame` with `judge_grade` (the cascade's annotation where the pair has one, else tier 1's grade),
    `judge_expected` (the deciding tier's expected grade where recorded, else tier 1's) and `human_grade`."""
    out = frame.assign(judge_grade=np.asarray(tier1_grades, dtype=float), judge_expected=frame["ce_expected"])
    if annotations is not None and len(annotations):
        ann = annotations[annotations["grade"].notna()].copy()
        ann["ann_expected"] = [deciding_expected(t, d) for t, d in zip(ann["tier_outputs"], ann["deciding_tier"])]
        ann = ann.sort_values("annotated_at").drop_duplicates(["query_id", "product_id"], keep="last")
        out = out.merge(ann[["query_id", "product_id", "grade", "ann_expected"]], on=["query_id", "product_id"], how="left")
        out["judge_grade"] = out["grade"].where(out["grade"].notna(), out["judge_grade"]).astype(float)
        out["judge_expected"] = out["ann_expected"].where(out["ann_expected"].notna(), out["judge_expected"])
        out = out.drop(columns=["grade", "ann_expected"])
    out["human_grade"] = np.nan
    if human is not None and len(human):
        grades = human[["query_id", "product_id", "grade"]].rename(columns={"grade": "human"})
        out = out.merge(grades.drop_duplicates(["query_id", "product_id"]), on=["query_id", "product_id"], how="left")
        out["human_grade"] = out.pop("human").astype(float)
    return out


def dev_ndcg(frame: pd.DataFrame, scores: np.ndarray, labels: pd.DataFrame, min_grade: int, max_grade: int) -> float:
    """Mean NDCG@10 (unjudged = 0) of `frame`'s candidates ordered by `scores`, on human `labels`."""
    ranked = rerank(frame, scores)
    per_query = per_query_metrics(ranked, labels, min_grade, max_grade, k=10, recall_k=max(10, max(map(len, ranked.values()), default=10)))
    values = per_query["ndcg@10"].dropna()
    return float(values.mean()) if len(values) else math.nan


def fit_and_select(train: pd.DataFrame, dev: pd.DataFrame, dev_labels: pd.DataFrame, columns: list[str],
                   choices: list[LabelChoice], params: RankerParams, min_grade: int, max_grade: int,
                   seed: int) -> tuple[Ranker, LabelChoice, list[dict]]:
    """One ranker per label choice on `train`; the one with the best dev NDCG@10 (ties: the earlier choice), and
    every choice's dev figure. `params.fits_at_once` choices are fitted at a time; the dev figures are worked out
    here, in the choices' order (ranx's compiled metrics are not called from two threads at once)."""
    def fit_and_score(choice: LabelChoice) -> tuple[Ranker, np.ndarray]:
        ranker = fit_one(train, columns, choice, params, min_grade, max_grade, seed)
        return ranker, ranker.score(dev)

    results, best = [], None
    with ThreadPoolExecutor(max_workers=params.fits_at_once) as pool:
        for choice, (ranker, dev_scores) in zip(choices, pool.map(fit_and_score, choices)):
            score = dev_ndcg(dev, dev_scores, dev_labels, min_grade, max_grade)
            results.append({"choice": choice.name, **choice.as_dict(), "dev_ndcg@10": score})
            log.info("ranker on %d queries, label %s: dev NDCG@10 %.4f", train["query_id"].nunique(), choice.name,
                     score)
            if best is None or (not math.isnan(score) and (math.isnan(best[0]) or score > best[0])):
                best = (score, ranker, choice)
    return best[1], best[2], results


def fit_one(train: pd.DataFrame, columns: list[str], choice: LabelChoice, params: RankerParams, min_grade: int,
            max_grade: int, seed: int) -> Ranker:
    levels, gains = relevance(train, choice.label, min_grade, max_grade, choice.steepness, choice.centre)
    return fit_ranker(train, columns, levels, gains, params, seed, info={"label": choice.as_dict()}, start=choice.start)
