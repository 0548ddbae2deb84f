"""Retrieval metrics on human labels, computed with ranx, with bootstrap confidence intervals.

Conventions (stated once, used everywhere):
- Gain of a judged item = grade - min_grade, so the lowest grade ("embarrassing") has gain 0 and
  CrowdFlower's 1..4 becomes 0..3. NDCG uses these linear gains (ranx `ndcg`, Jarvelin-Kekalainen).
- `ndcg@10`: unjudged retrieved items count as gain 0. `ndcg@10_judged`: unjudged items are removed
  from the ranking before scoring (condensed lists). Both are undefined (NaN, excluded from means)
  for a query whose judged items all have gain 0.
- `lowest_share@10`: among the judged items in the top 10, the fraction with the lowest grade;
  queries with no judged item in the top 10 are excluded from the mean (the count is reported).
- `recall@100_top`: share of the query's top-grade items (grade == max_grade) found in the top 100;
  undefined for a query without a top-grade item.
- Duplicate (query_id, product_id) label rows are merged like ingest does: rounded mean grade
  (half up), variance = mean variance + spread of the merged grades (`merge_labels`, the one pandas
  implementation of `annomine.ingestion.validate_labels`' rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from annomine.text import normalise_query

K = 10
RECALL_K = 100
SEGMENTS = ("head", "torso", "tail")
# metric name -> description, in report order
METRICS: dict[str, str] = {
    "ndcg@10": "NDCG@10, unjudged = gain 0",
    "ndcg@10_judged": "NDCG@10 over judged items only (condensed list)",
    "lowest_share@10": "share of lowest-grade items among judged top-10 items",
    "recall@100_top": "Recall@100 of top-grade items",
}


# ---- labels --------------------------------------------------------------------------------
def merge_labels(labels: pd.DataFrame, min_grade: int, max_grade: int, source: str = "labels") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate and merge label rows: (merged, rejected).

    `labels`: query_id, product_id, grade[, variance] (strings or numbers, one row per judgment).
    merged: query_id, product_id, grade (int), variance (float), n_judgments - one row per pair.
    rejected: line (1-based line in a file with a header row), query_id, product_id, reason.
    """
    df = labels.copy()
    for col in ("query_id", "product_id", "grade"):
        if col not in df.columns:
            raise ValueError(f"{source}: missing required column '{col}' (have {list(labels.columns)})")
    if "variance" not in df.columns:
        df["variance"] = None
    df["query_id"] = df["query_id"].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip())
    df["product_id"] = df["product_id"].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip())
    grade = pd.to_numeric(df["grade"].map(lambda v: str(v).strip() if v is not None else None), errors="coerce")
    variance_raw = df["variance"].map(lambda v: None if v is None or str(v).strip() in ("", "nan", "None") else str(v).strip())
    variance = pd.to_numeric(variance_raw, errors="coerce")
    reason = pd.Series([None] * len(df), index=df.index, dtype=object)

    def mark(mask, text):
        reason[mask & reason.isna()] = text

    mark(df["query_id"] == "", "missing query_id")
    mark(df["product_id"] == "", "missing product_id")
    mark(grade.isna() | (grade != np.floor(grade)), "grade is not an integer")
    mark((grade < min_grade) | (grade > max_grade), f"grade outside {min_grade}..{max_grade}")
    mark(variance_raw.notna() & variance.isna(), "variance is not a number")
    bad = reason.notna()
    rejected = pd.DataFrame({
        "line": [int(i) + 2 for i in range(len(df))],
        "query_id": df["query_id"].values, "product_id": df["product_id"].values, "reason": reason.values,
    })[bad.values].reset_index(drop=True)
    good = pd.DataFrame({"query_id": df["query_id"], "product_id": df["product_id"],
                         "grade": grade, "variance": variance.fillna(0.0)})[~bad]
    if good.empty:
        merged = pd.DataFrame({"query_id": pd.Series(dtype=str), "product_id": pd.Series(dtype=str),
                               "grade": pd.Series(dtype=int), "variance": pd.Series(dtype=float),
                               "n_judgments": pd.Series(dtype=int)})
        return merged, rejected
    groups = good.groupby(["query_id", "product_id"], sort=True)
    merged = groups.agg(_mean=("grade", "mean"), _var=("variance", "mean"), n_judgments=("grade", "size")).reset_index()
    spread = groups["grade"].agg(lambda g: float(np.var(g.to_numpy(), ddof=0))).reset_index(drop=True)
    merged["grade"] = np.floor(merged["_mean"] + 0.5).astype(int)
    merged["variance"] = (merged["_var"] + spread.to_numpy()).round(3)
    return merged[["query_id", "product_id", "grade", "variance", "n_judgments"]], rejected


# ---- query segments ------------------------------------------------------------------------
def segments_by_frequency(frequency: pd.Series, query_ids: pd.Series, head_share: float = 0.5, torso_share: float = 0.8) -> pd.Series:
    """head / torso / tail by cumulative share of traffic, the rule of `ingestion.assign_segments`.

    Queries are ordered by frequency (desc, then query_id); a query is head while the traffic of
    the queries before it is < head_share of the total, torso while < torso_share, else tail.
    """
    freq = pd.to_numeric(frequency, errors="coerce").fillna(0).astype(float)
    order = pd.DataFrame({"f": freq.values, "q": query_ids.astype(str).values}, index=frequency.index)
    order = order.sort_values(["f", "q"], ascending=[False, True], kind="mergesort")
    total = order["f"].sum()
    if total <= 0:
        return pd.Series("tail", index=frequency.index)
    previous = (order["f"].cumsum() - order["f"]) / total
    seg = np.where(previous < head_share, "head", np.where(previous < torso_share, "torso", "tail"))
    return pd.Series(seg, index=order.index).reindex(frequency.index)


LENGTH_RULE = "query length (1 token head, 2 torso, 3+ tail)"


def segments_by_length(queries: pd.Series) -> pd.Series:
    """1 token -> head, 2 tokens -> torso, 3+ tokens -> tail (tokens of `normalise_query`)."""
    def segment(text) -> str:
        n = len(normalise_query(text if isinstance(text, str) else "").split())
        return "head" if n <= 1 else "torso" if n == 2 else "tail"

    return queries.map(segment)


def assign_segments(queries: pd.DataFrame, head_share: float = 0.5, torso_share: float = 0.8) -> tuple[pd.Series, str]:
    """(segment per row, rule). Frequency rule when every query has a frequency, else query length."""
    if "frequency" in queries.columns:
        freq = pd.to_numeric(queries["frequency"], errors="coerce")
        if len(freq) and freq.notna().all():
            rule = f"frequency (cumulative traffic share: head < {head_share}, torso < {torso_share}, rest tail)"
            return segments_by_frequency(freq, queries["query_id"], head_share, torso_share), rule
        missing = int(freq.isna().sum())
        rule = f"{LENGTH_RULE}; frequency missing for {missing} queries"
        return segments_by_length(queries["query"]), rule
    return segments_by_length(queries["query"]), f"{LENGTH_RULE}; no frequency column"


# ---- per-query metrics (ranx) --------------------------------------------------------------
def _ranx_run(ranked: dict[str, list[str]], depth: int):
    from ranx import Run

    return Run({q: {pid: float(len(ids) - i) for i, pid in enumerate(ids[:depth])} for q, ids in ranked.items()})


def _ranx_scores(qrels: dict[str, dict[str, int]], ranked: dict[str, list[str]], metric: str, depth: int) -> dict[str, float]:
    """Per-query values of one ranx metric over the queries of `qrels`."""
    from ranx import Qrels, evaluate

    qids = [q for q in sorted(qrels) if qrels[q]]
    if not qids:
        return {}
    run = _ranx_run({q: ranked.get(q, []) for q in qids}, depth)
    evaluate(Qrels({q: qrels[q] for q in qids}), run, [metric], return_mean=False, make_comparable=True)
    # ranx keeps the per-query values on the run, keyed by query id (no reliance on array order).
    return {str(q): float(v) for q, v in run.scores[metric].items()}


def per_query_metrics(ranked: dict[str, list[str]], labels: pd.DataFrame, min_grade: int, max_grade: int,
                      k: int = K, recall_k: int = RECALL_K) -> pd.DataFrame:
    """One row per labelled query: the four metrics and the grades of its top k.

    ranked: query_id -> product ids, best first (at least `recall_k` deep where available).
    labels: merged labels (query_id, product_id, grade).
    """
    judged: dict[str, dict[str, int]] = {}
    for q, pid, grade in zip(labels["query_id"], labels["product_id"], labels["grade"]):
        judged.setdefault(str(q), {})[str(pid)] = int(grade)
    qids = sorted(judged)
    gains = {q: {p: g - min_grade for p, g in d.items()} for q, d in judged.items()}
    condensed = {q: [p for p in ranked.get(q, []) if p in judged[q]] for q in qids}
    top_grade = {q: {p: 1 for p, g in d.items() if g == max_grade} for q, d in judged.items()}
    lowest = {q: {p: 1 for p, g in d.items() if g == min_grade} for q, d in judged.items()}
    in_judged = {q: {p: 1 for p in d} for q, d in judged.items()}

    ndcg = _ranx_scores(gains, ranked, f"ndcg@{k}", recall_k)
    ndcg_j = _ranx_scores(gains, condensed, f"ndcg@{k}", recall_k)
    recall = _ranx_scores(top_grade, ranked, f"recall@{recall_k}", recall_k)
    hits_low = _ranx_scores(lowest, ranked, f"hits@{k}", k)
    hits_judged = _ranx_scores(in_judged, ranked, f"hits@{k}", k)

    rows = []
    for q in qids:
        has_gain = any(g > 0 for g in gains[q].values())
        n_j = int(round(hits_judged.get(q, 0.0)))
        n_low = int(round(hits_low.get(q, 0.0)))
        top = ranked.get(q, [])[:k]
        rows.append({
            "query_id": q,
            "n_labels": len(judged[q]),
            "n_retrieved": len(ranked.get(q, [])),
            "ndcg@10": ndcg.get(q, math.nan) if has_gain else math.nan,
            "ndcg@10_judged": ndcg_j.get(q, math.nan) if has_gain else math.nan,
            "judged@10": n_j,
            "lowest@10": n_low,
            "lowest_share@10": (n_low / n_j) if n_j else math.nan,
            "n_top_grade": len(top_grade[q]),
            "recall@100_top": recall.get(q, math.nan) if top_grade[q] else math.nan,
            "top10_grades": [judged[q].get(p) for p in top],
            "top10_ids": list(top),
        })
    return pd.DataFrame(rows)


# ---- bootstrap -----------------------------------------------------------------------------
@dataclass
class Estimate:
    mean: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def bootstrap_ci(values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 13) -> Estimate:
    """Mean of the non-NaN values with a percentile bootstrap CI over them (resampling queries)."""
    arr = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=float)
    n = int(arr.size)
    if n == 0:
        return Estimate(None, None, None, 0)
    mean = float(arr.mean())
    if n == 1 or n_resamples <= 0:
        return Estimate(mean, mean, mean, n)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 256):  # chunks keep memory flat for large query sets
        stop = min(n_resamples, start + 256)
        means[start:stop] = arr[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(mean, float(min(low, mean)), float(max(high, mean)), n)


def summarise(per_query: pd.DataFrame, segment: pd.Series | None = None, n_resamples: int = 1000,
              confidence: float = 0.95, seed: int = 13) -> dict:
    """{'all': {metric: estimate}, 'head': ..., 'torso': ..., 'tail': ...} plus counts.

    `segment`: segment per query_id (index = query_id); absent segments are left out.
    """
    def block(rows: pd.DataFrame) -> dict:
        out = {m: bootstrap_ci(rows[m].tolist(), n_resamples, confidence, seed).as_dict() for m in METRICS}
        out["n_queries"] = int(len(rows))
        out["n_queries_without_judged_top10"] = int((rows["judged@10"] == 0).sum())
        out["judged_share@10"] = float(rows["judged@10"].sum() / max(1, 10 * len(rows))) if len(rows) else None
        return out

    result = {"all": block(per_query)}
    if segment is not None:
        seg = per_query["query_id"].map(segment)
        for name in SEGMENTS:
            rows = per_query[seg == name]
            if len(rows):
                result[name] = block(rows)
    return result


HYBRID_SUFFIX = "+bm25"  # a dense spec fused with BM25 (annomine/model_specs.py)


def _same_kind(model: str, reference: str, evaluated) -> str:
    """The reference a model is compared with: a hybrid (`curriculum+bm25`) against the reference's hybrid
    (`human+bm25`) where that was evaluated too, so fusion is not credited to the training data."""
    if model.endswith(HYBRID_SUFFIX) and reference + HYBRID_SUFFIX in evaluated:
        return reference + HYBRID_SUFFIX
    return reference


def compare_to_baselines(per_query: pd.DataFrame, baselines: list[str], models: list[str], n_resamples: int = 1000,
                         confidence: float = 0.95, seed: int = 13, reference_for_lowest: str = "minilm",
                         also_against: tuple[str, ...] = ()) -> list[dict]:
    """Each non-baseline model against the better baseline on NDCG@10 and against `reference_for_lowest`
    (else the better baseline) on the lowest-grade share, paired over the queries both can score; and on
    NDCG@10 against each evaluated model named in `also_against` (e.g. `human`: fine-tuning on the labels
    a user already has, the alternative the pipeline has to beat).

    per_query: rows of (model, query_id, metric columns). Returns one dict per (model, metric):
    model, against, metric, model_mean, baseline_mean, ratio (of the paired means), diff (estimate).

    Pairing removes the between-query spread that makes two models' separate CIs overlap: the CI of
    the mean per-query difference asks whether the model wins on the same queries."""
    present = [b for b in baselines if b in set(per_query["model"])]
    if not present:
        return []
    wide = {m: per_query[per_query["model"] == m].set_index("query_id") for m in set(per_query["model"])}
    best = max(present, key=lambda b: wide[b]["ndcg@10"].mean())
    against = {"ndcg@10": best, "lowest_share@10": reference_for_lowest if reference_for_lowest in present else best}
    out = []
    for model in models:
        if model in baselines or model not in wide:
            continue
        refs = list(against.items()) + [("ndcg@10", r) for r in (_same_kind(model, r, wide) for r in also_against)
                                        if r in wide and r != model]
        for metric, base in refs:
            pair = pd.concat([wide[model][metric].rename("m"), wide[base][metric].rename("b")], axis=1).dropna()
            if pair.empty:
                continue
            m_mean, b_mean = float(pair["m"].mean()), float(pair["b"].mean())
            diff = bootstrap_ci((pair["m"] - pair["b"]).tolist(), n_resamples, confidence, seed)
            out.append({"model": model, "against": base, "metric": metric, "model_mean": m_mean, "baseline_mean": b_mean,
                        "ratio": m_mean / b_mean if b_mean else None, "diff": diff.as_dict()})
    return out


def ranked_comparisons(per_query: pd.DataFrame, ranked: list[str], references: list[str], n_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 13, known: list[dict] = ()) -> list[dict]:
    """Each ranked list (the rank stage's) against every other evaluated model (zero-shot MiniLM, the retriever
    alone, the RRF hybrid, the cross-encoder rerank, ...), on NDCG@10 and the lowest-grade share, paired over
    the same queries; the same rows as `compare_to_baselines`, leaving out those already in `known`."""
    seen = {(c["model"], c["against"], c["metric"]) for c in known}
    out = []
    for reference in references:
        if reference in ranked:
            continue
        out += [c for c in compare_to_baselines(per_query, [reference], [m for m in ranked if m != reference],
                                                n_resamples, confidence, seed, reference_for_lowest=reference)
                if (c["model"], c["against"], c["metric"]) not in seen]
    return out


def grade_distribution(per_query: pd.DataFrame, min_grade: int, max_grade: int) -> dict[str, int]:
    """Counts of each grade (and 'unjudged') over all top-10 positions of all queries."""
    counts = {str(g): 0 for g in range(min_grade, max_grade + 1)}
    counts["unjudged"] = 0
    for grades in per_query["top10_grades"]:
        for g in grades:
            counts["unjudged" if g is None or (isinstance(g, float) and math.isnan(g)) else str(int(g))] += 1
    return counts
