"""Evaluation metrics on a tiny hand-computed example, segment rules, bootstrap CIs, FAISS indexes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from annomine.evaluation import metrics as M
from annomine.evaluation.index import IndexConfig, build_index, recall_against_flat, retrieve_dense, search


def _labels(rows):
    return pd.DataFrame(rows, columns=["query_id", "product_id", "grade"])


# q1: gains (grade - 1) a=3, b=0, c=1, d=2; ranked a, x (unjudged), b, c; d never retrieved.
# q2: every judged item has the lowest grade: NDCG undefined, lowest-grade share 1.
# q3: only unjudged items retrieved: NDCG 0, no judged item in the top 10, recall of top grade 0.
LABELS = _labels([
    ("q1", "a", 4), ("q1", "b", 1), ("q1", "c", 2), ("q1", "d", 3),
    ("q2", "e", 1), ("q2", "f", 1),
    ("q3", "g", 4), ("q3", "h", 3),
])
RANKED = {"q1": ["a", "x", "b", "c"], "q2": ["e", "y"], "q3": ["z1", "z2"]}


def _dcg(gains):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


@pytest.fixture(scope="module")
def per_query():
    merged, rejected = M.merge_labels(LABELS, 1, 4)
    assert rejected.empty
    return M.per_query_metrics(RANKED, merged, 1, 4).set_index("query_id")


def test_ndcg_with_graded_gains_and_unjudged_as_zero(per_query):
    ideal = _dcg([3, 2, 1, 0])
    assert per_query.loc["q1", "ndcg@10"] == pytest.approx(_dcg([3, 0, 0, 1]) / ideal)
    assert per_query.loc["q1", "ndcg@10"] == pytest.approx(0.720449, abs=1e-6)  # by hand: 3.430677 / 4.761860
    assert per_query.loc["q3", "ndcg@10"] == 0.0


def test_judged_only_condenses_the_list(per_query):
    # x is dropped: a, b, c at ranks 1, 2, 3.
    assert per_query.loc["q1", "ndcg@10_judged"] == pytest.approx(_dcg([3, 0, 1]) / _dcg([3, 2, 1, 0]))
    assert per_query.loc["q1", "ndcg@10_judged"] == pytest.approx(0.735007, abs=1e-6)
    assert per_query.loc["q1", "ndcg@10_judged"] > per_query.loc["q1", "ndcg@10"]
    assert per_query.loc["q3", "ndcg@10_judged"] == 0.0


def test_ndcg_undefined_without_positive_gain(per_query):
    assert math.isnan(per_query.loc["q2", "ndcg@10"])
    assert math.isnan(per_query.loc["q2", "ndcg@10_judged"])


def test_lowest_grade_share_among_judged_top10(per_query):
    assert per_query.loc["q1", "judged@10"] == 3
    assert per_query.loc["q1", "lowest@10"] == 1
    assert per_query.loc["q1", "lowest_share@10"] == pytest.approx(1 / 3)
    assert per_query.loc["q2", "lowest_share@10"] == 1.0
    assert math.isnan(per_query.loc["q3", "lowest_share@10"])  # no judged item: excluded


def test_recall_of_top_grade(per_query):
    assert per_query.loc["q1", "recall@100_top"] == 1.0
    assert per_query.loc["q3", "recall@100_top"] == 0.0
    assert math.isnan(per_query.loc["q2", "recall@100_top"])  # no top-grade item


def test_summary_means_and_exclusions(per_query):
    summary = M.summarise(per_query.reset_index(), None, n_resamples=200, seed=1)["all"]
    assert summary["ndcg@10"]["mean"] == pytest.approx((0.720449 + 0.0) / 2, abs=1e-6)
    assert summary["ndcg@10"]["n"] == 2
    assert summary["lowest_share@10"]["mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["lowest_share@10"]["n"] == 2
    assert summary["n_queries_without_judged_top10"] == 1
    assert summary["recall@100_top"]["mean"] == pytest.approx(0.5)
    assert M.grade_distribution(per_query.reset_index(), 1, 4) == {"1": 2, "2": 1, "3": 0, "4": 1, "unjudged": 4}


def test_gain_is_grade_minus_min_grade():
    """The same judgments on a 0..3 scale give the same numbers as on 1..4."""
    shifted = LABELS.assign(grade=LABELS["grade"] - 1)
    a = M.per_query_metrics(RANKED, M.merge_labels(LABELS, 1, 4)[0], 1, 4)
    b = M.per_query_metrics(RANKED, M.merge_labels(shifted, 0, 3)[0], 0, 3)
    cols = ["ndcg@10", "ndcg@10_judged", "lowest_share@10", "recall@100_top"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_merge_labels_rounds_the_mean_and_rejects_bad_rows():
    raw = pd.DataFrame({
        "query_id": ["1", "1", "2", "2", "2", "3", "3", "4", ""],
        "product_id": ["p", "p", "p", "p", "p", "p", "q", "p", "p"],
        "grade": ["2", "3", "1", "2", "2", "5", "x", "4", "3"],
        "variance": ["0.5", "0.0", "", "", "", "0", "0", "abc", "0"],
    })
    merged, rejected = M.merge_labels(raw, 1, 4)
    got = merged.set_index(["query_id", "product_id"])
    assert got.loc[("1", "p"), "grade"] == 3  # mean 2.5 rounds half up, like ingest
    assert got.loc[("1", "p"), "variance"] == pytest.approx(0.25 + 0.25)  # mean variance + spread
    assert got.loc[("1", "p"), "n_judgments"] == 2
    assert got.loc[("2", "p"), "grade"] == 2  # mean 1.667
    assert len(merged) == 2
    reasons = dict(zip(rejected["line"], rejected["reason"]))
    assert reasons == {7: "grade outside 1..4", 8: "grade is not an integer", 9: "variance is not a number",
                       10: "missing query_id"}


def test_merge_labels_names_missing_column():
    with pytest.raises(ValueError, match="labels.tsv: missing required column 'grade'"):
        M.merge_labels(pd.DataFrame({"query_id": ["1"], "product_id": ["p"]}), 1, 4, "labels.tsv")


def test_segments_by_frequency_cumulative_share():
    queries = pd.DataFrame({"query_id": ["a", "b", "c", "d"], "query": ["x"] * 4, "frequency": [10, 50, 30, 10]})
    seg, rule = M.assign_segments(queries)
    assert rule.startswith("frequency")
    assert seg.tolist() == ["tail", "head", "torso", "tail"]


def test_segments_by_length_when_frequency_unknown():
    queries = pd.DataFrame({"query_id": ["a", "b", "c", "d"],
                            "query": ["tv", "red shoes", "16 gb memory card", "  iPhone-5 case!"]})
    seg, rule = M.assign_segments(queries)
    assert rule.startswith("query length") and "no frequency column" in rule
    assert seg.tolist() == ["head", "torso", "tail", "tail"]
    partial = queries.assign(frequency=[5, None, 1, 1])
    seg, rule = M.assign_segments(partial)
    assert rule.startswith("query length") and "missing for 1" in rule


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = list(np.random.default_rng(0).uniform(0, 1, size=60)) + [float("nan")]
    a = M.bootstrap_ci(values, n_resamples=500, seed=7)
    b = M.bootstrap_ci(values, n_resamples=500, seed=7)
    c = M.bootstrap_ci(values, n_resamples=500, seed=8)
    assert a == b
    assert a.n == 60
    assert a.mean == pytest.approx(float(np.nanmean(values)))
    assert a.low < a.mean < a.high
    assert (c.low, c.high) != (a.low, a.high)
    assert 0.05 < a.high - a.low < 0.3  # about 2 * 1.96 * 0.29 / sqrt(60) = 0.15
    assert M.bootstrap_ci([], seed=1).mean is None
    assert M.bootstrap_ci([0.4], seed=1).as_dict() == {"mean": 0.4, "ci_low": 0.4, "ci_high": 0.4, "n": 1}


def _unit(n, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_flat_is_exact_and_hnsw_ivf_recall_against_flat():
    items, queries = _unit(3000, 32, 0), _unit(50, 32, 1)
    _, flat_ids = search(build_index(items, IndexConfig(kind="flat")), queries, 10)
    exact = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    assert (flat_ids == exact).all()
    _, info = retrieve_dense(items, queries, 10, IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_search=64))
    assert 0.8 <= info["recall_vs_flat@10"] <= 1.0
    cfg = IndexConfig(kind="ivf", ivf_nlist=16, ivf_nprobe=16)  # probing every list: exact
    ids, info = retrieve_dense(items, queries, 10, cfg)
    assert info["recall_vs_flat@10"] == 1.0 and info["ivf_nlist"] == 16
    _, info = retrieve_dense(items, queries, 10, IndexConfig(kind="ivf", ivf_nlist=64, ivf_nprobe=1))
    assert info["recall_vs_flat@10"] < 1.0


def test_recall_against_flat_by_hand():
    assert recall_against_flat(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 6, 7]])) == pytest.approx((2 / 3 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        IndexConfig(kind="lsh").validate()


def test_paired_comparison_against_the_better_baseline_hand_computed():
    rows = []
    for q, (bm25, minilm, tt) in enumerate([(0.5, 0.6, 0.9), (0.7, 0.8, 0.8), (0.3, 0.4, float("nan"))]):
        for model, v in (("bm25", bm25), ("minilm", minilm), ("tt", tt)):
            rows.append({"model": model, "query_id": f"q{q}", "ndcg@10": v, "lowest_share@10": {"bm25": 0.2, "minilm": 0.1, "tt": 0.05}[model]})
    out = M.compare_to_baselines(pd.DataFrame(rows), ["bm25", "minilm"], ["bm25", "minilm", "tt"], n_resamples=200)
    ndcg = next(c for c in out if c["metric"] == "ndcg@10")
    # minilm is the better baseline (0.6 mean); tt's NaN query is left out of the pair: (0.9 + 0.8) vs (0.6 + 0.8)
    assert ndcg["against"] == "minilm" and ndcg["diff"]["n"] == 2
    assert ndcg["model_mean"] == pytest.approx(0.85) and ndcg["baseline_mean"] == pytest.approx(0.7)
    assert ndcg["ratio"] == pytest.approx(0.85 / 0.7) and ndcg["diff"]["mean"] == pytest.approx(0.15)
    assert ndcg["diff"]["ci_low"] == pytest.approx(0.0) and ndcg["diff"]["ci_high"] == pytest.approx(0.3)
    lowest = next(c for c in out if c["metric"] == "lowest_share@10")
    assert lowest["against"] == "minilm" and lowest["ratio"] == pytest.approx(0.5)
    assert [c["model"] for c in out] == ["tt", "tt"]  # baselines are not compared with themselves


def test_every_model_is_also_compared_with_the_human_variant_on_ndcg():
    rows = []
    for q, (minilm, human, tt) in enumerate([(0.5, 0.6, 0.9), (0.7, 0.6, 0.8)]):
        for model, v in (("minilm", minilm), ("human", human), ("tt", tt)):
            rows.append({"model": model, "query_id": f"q{q}", "ndcg@10": v, "lowest_share@10": 0.1})
    out = M.compare_to_baselines(pd.DataFrame(rows), ["minilm"], ["minilm", "human", "tt"], n_resamples=200,
                                 also_against=("human", "absent"))
    vs_human = [c for c in out if c["against"] == "human"]
    assert [(c["model"], c["metric"]) for c in vs_human] == [("tt", "ndcg@10")]  # never human against itself
    assert vs_human[0]["diff"]["mean"] == pytest.approx(0.25) and vs_human[0]["ratio"] == pytest.approx(0.85 / 0.6)
    assert {c["against"] for c in out if c["model"] == "human"} == {"minilm"}


def test_a_hybrid_is_compared_with_the_human_variant_s_hybrid():
    rows = []
    for q, values in enumerate([(0.5, 0.6, 0.7, 0.9), (0.7, 0.6, 0.8, 0.8)]):
        for model, v in zip(("minilm", "human", "human+bm25", "tt+bm25"), values):
            rows.append({"model": model, "query_id": f"q{q}", "ndcg@10": v, "lowest_share@10": 0.1})
    out = M.compare_to_baselines(pd.DataFrame(rows), ["minilm"], ["minilm", "human", "human+bm25", "tt+bm25"],
                                 n_resamples=200, also_against=("human",))
    assert {c["against"] for c in out if c["model"] == "tt+bm25" and c["metric"] == "ndcg@10"} == {"minilm", "human+bm25"}
    assert {c["against"] for c in out if c["model"] == "human+bm25"} == {"minilm"}  # never the reference against itself
