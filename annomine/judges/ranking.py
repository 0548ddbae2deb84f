"""Can the judge teach ranking? Its order of each query's labelled products against the starting retriever's.

A retriever trained on a judge's grades learns, at best, the judge's order of products. `ranking_headroom`
orders the same labelled products of each query twice, by the judge's expected grade and by the starting
retriever's cosine, scores both orders with NDCG@10 against the human grades (the ranx measure of `annomine
evaluate`, `annomine.evaluation.metrics.per_query_metrics`) and reports the paired difference with a bootstrap CI
over queries. A judge that orders products no better than the retriever it is meant to teach leaves the
curriculum nothing to add on unseen queries: that is the first thing to check when trained models do not beat
their zero-shot start (docs/experiments.md, issue 17).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from annomine.evaluation.metrics import bootstrap_ci, per_query_metrics


def order_by_score(query_ids, product_ids, scores) -> dict[str, list[str]]:
    """query_id -> product ids, highest score first; ties in product-id order, so the order is deterministic."""
    frame = pd.DataFrame({"q": [str(q) for q in query_ids], "p": [str(p) for p in product_ids],
                          "s": np.asarray(scores, dtype=float)})
    frame = frame.sort_values(["q", "s", "p"], ascending=[True, False, True], kind="mergesort")
    return {q: group["p"].tolist() for q, group in frame.groupby("q", sort=False)}


def _compare(both: pd.DataFrame, n_resamples: int, seed: int) -> dict:
    judge = bootstrap_ci(both["judge"].tolist(), n_resamples, seed=seed)
    baseline = bootstrap_ci(both["baseline"].tolist(), n_resamples, seed=seed)
    diff = bootstrap_ci((both["judge"] - both["baseline"]).tolist(), n_resamples, seed=seed)
    return {"n_queries": int(len(both)), "judge_ndcg@10": judge.as_dict(), "baseline_ndcg@10": baseline.as_dict(),
            "diff": diff.as_dict(), "ratio": (judge.mean / baseline.mean) if baseline.mean else None,
            "judge_wins": int((both["judge"] > both["baseline"]).sum()),
            "baseline_wins": int((both["judge"] < both["baseline"]).sum())}


def ranking_headroom(pairs: pd.DataFrame, judge_scores, baseline_scores, min_grade: int, max_grade: int,
                     n_resamples: int = 1000, seed: int = 13, segments: pd.Series | None = None) -> dict:
    """NDCG@10 of the judge's order and of the baseline's over each query's labelled products, paired.

    pairs: query_id, product_id, grade (the human grade), one row per labelled pair, aligned with the two score
    arrays. Queries with no product above the lowest grade have no NDCG and are left out. Returns the two means
    with their CIs, the paired difference (judge - baseline) with its CI, the ratio of the means and how many
    queries each order wins; with `segments` (segment per query id), the same per segment under `by_segment`.
    """
    labels = pairs[["query_id", "product_id", "grade"]].astype({"query_id": str, "product_id": str})
    scores = {"judge": judge_scores, "baseline": baseline_scores}
    per_query = {}
    for name, values in scores.items():
        ranked = order_by_score(labels["query_id"], labels["product_id"], values)
        per_query[name] = per_query_metrics(ranked, labels, min_grade, max_grade).set_index("query_id")["ndcg@10"]
    both = pd.concat(per_query, axis=1).dropna()
    result = _compare(both, n_resamples, seed)
    if segments is not None:
        segment = segments.rename(index=str).reindex(both.index)
        result["by_segment"] = {str(name): _compare(both[segment == name], n_resamples, seed)
                                for name in sorted(segment.dropna().unique())}
    return result
