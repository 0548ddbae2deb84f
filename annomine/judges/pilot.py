"""The teacher pilot: is the configured cascade worth a full annotate run? (`annomine judge pilot`)

It grades a stratified sample of the mined candidates that humans labelled (strata: difficulty level, query
segment and the channels that found the pair) among the queries the teacher never learned from
(`unseen_by_teacher`: with tier 1, the judge's calibration and dev queries; never a test query), measures agreement with the human grades (exact, QWK) and the
`ranking` check (annomine/judges/ranking.py): each sampled query's products ordered by the teacher's score
against the zero-shot encoder's order, NDCG@10 paired with a bootstrap CI. The verdict follows from that CI:
above 0, the teacher is expected to help; at or below 0, it cannot help; across 0, there is not enough evidence,
with the number of labelled queries that would make the CI's half-width smaller than the observed difference
(the half-width shrinks as 1/sqrt(queries)).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from annomine.vocabulary import CHANNELS

STRATA = ["level", "segment", "channels"]
# The judge's query splits (annomine.judges.data.assign_splits) whose labels a pilot may grade.
UNSEEN_BY_TIER1 = ("calibration", "dev")
UNSEEN_BY_LLM = ("train", "calibration", "dev")
EXPECTED, CANNOT, UNSURE = "expected to help", "cannot help", "not enough evidence"


def channels_of(pdf: pd.DataFrame) -> pd.Series:
    """The channels that retrieved each candidate ('lexical+bm25', ...; 'none' when none did)."""
    present = [ch for ch in CHANNELS if f"rank_{ch}" in pdf.columns]
    found = pd.Series("", index=pdf.index, dtype=object)
    for ch in present:
        hit = pdf[f"rank_{ch}"].notna()
        found[hit] = found[hit].map(lambda s, c=ch: f"{s}+{c}" if s else c)
    return found.replace("", "none")


def unseen_by_teacher(pdf: pd.DataFrame, splits: pd.Series, learned_tier: bool) -> pd.DataFrame:
    """The candidates of the queries whose labels the teacher never learned from: with a learned tier (tier 1 trains
    on the judge's train queries) its calibration and dev queries, else every non-test query. Test queries are for
    reporting only, so a pilot, which decides whether to pay, never reads them."""
    keep = UNSEEN_BY_TIER1 if learned_tier else UNSEEN_BY_LLM
    return pdf[splits.isin(keep).to_numpy()].reset_index(drop=True)


def stratified_sample(pdf: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most `n` rows, allocated to the strata in proportion to their size and at least one per stratum; seeded."""
    if len(pdf) <= n:
        return pdf.copy()
    keys = pdf[STRATA].astype(str).agg("|".join, axis=1)
    sizes = keys.value_counts()
    quota = {k: max(1, int(round(n * size / len(pdf)))) for k, size in sizes.items()}
    rng = np.random.default_rng(seed)
    chosen = []
    for key in sorted(quota):
        rows = np.flatnonzero((keys == key).to_numpy())
        chosen.extend(rng.choice(rows, size=min(quota[key], len(rows)), replace=False).tolist())
    return pdf.iloc[sorted(chosen)].reset_index(drop=True)


def teacher_scores(graded: pd.DataFrame) -> np.ndarray:
    """Each pair's score in the teacher's order: the expected grade of the last tier that gave a distribution,
    else the cascade's grade (NaN when the pair failed)."""
    scores = []
    for outputs, grade in zip(graded["tier_outputs"], graded["grade"]):
        expected = [r.get("expected_grade") for r in json.loads(outputs or "{}").values() if r.get("expected_grade") is not None]
        scores.append(float(expected[-1]) if expected else (float(grade) if pd.notna(grade) else math.nan))
    return np.asarray(scores, dtype=float)


def verdict(ranking: dict) -> dict:
    """Expected to help / cannot help / not enough evidence, from the paired difference's CI over queries."""
    diff, n = ranking["diff"], int(ranking["n_queries"])
    mean, low, high = diff.get("mean"), diff.get("ci_low"), diff.get("ci_high")
    if mean is None or n < 2:
        return {"verdict": UNSURE, "reason": f"{n} query(ies) with a ranking: too few to compare orders",
                "more_labelled_queries": None}
    if low > 0:
        return {"verdict": EXPECTED, "reason": f"the teacher orders products better: NDCG@10 {mean:+.4f} "
                                                f"[{low:+.4f}, {high:+.4f}] over {n} queries", "more_labelled_queries": 0}
    if high <= 0:
        return {"verdict": CANNOT, "reason": f"the teacher orders products no better than the zero-shot encoder: NDCG@10 "
                                             f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] over {n} queries",
                "more_labelled_queries": 0}
    half = (high - low) / 2.0
    more = None if mean == 0 else max(1, math.ceil(n * (half / abs(mean)) ** 2) - n)
    return {"verdict": UNSURE, "reason": f"NDCG@10 {mean:+.4f} [{low:+.4f}, {high:+.4f}] over {n} queries: the CI "
                                         "spans 0" + ("" if more else " and the difference is 0"),
            "more_labelled_queries": more}


def scale_forecast(fc: dict, factor: float) -> dict:
    """A sample's forecast scaled to the population it was drawn from (`factor` = population / sample)."""
    out = json.loads(json.dumps(fc))
    out["pairs"] = int(round(fc["pairs"] * factor))
    out["escalate"] = int(round(fc["escalate"] * factor))
    for t in out.get("tiers", {}).values():
        for key in ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "usd", "usd_if_batch", "uncached_pairs"):
            if t.get(key) is not None:
                t[key] = round(t[key] * factor, 6)
    if out.get("usd") is not None:
        out["usd"] = round(out["usd"] * factor, 6)
    out["extrapolated_from_sample_by"] = round(factor, 3)
    return out
