"""The lab's pooled reports (lab/pool.py, lab/folds.py): both folds' test reports of `annomine evaluate`, then
every rotation's pooled folds, as one report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_evaluate import _conf, shop, tiny_model  # noqa: F401  (fixtures)


def test_the_other_fold_swaps_dev_and_test_and_the_two_pool_into_one_report(spark, project, tmp_path, shop, tiny_model,
                                                                              capsys):
    from lab.folds import FoldReportError
    from jobs import evaluate
    from lab import pool as pool_job

    conf = _conf(tmp_path, project)
    files = ["--products", str(shop / "products.tsv"), "--queries", str(shop / "queries.tsv"), "--labels", str(shop / "labels.tsv")]
    models = ["--models", f"bm25,tower={tiny_model}"]
    assert evaluate.main(["--conf", conf, *models, *files, "--no-mlflow"]) == 0
    with pytest.raises(FoldReportError, match=r"no test report for fold\(s\) \[1\]"):
        pool_job.main(["--conf", conf, "--no-mlflow"])
    capsys.readouterr()
    assert evaluate.main(["--conf", conf, *models, *files, "--set", "project.fold=1"]) == 0
    printed = capsys.readouterr().out
    assert "fold 1: nothing registered" in printed
    fold0 = json.loads((project.warehouse_path / "evaluation" / "report_test.json").read_text())
    fold1 = json.loads((project.warehouse_path / "folds" / "fold1" / "evaluation" / "report_test.json").read_text())
    # fold 1: fold 0's dev query reports and its test queries select; the train query is in neither
    assert {r["query_id"] for r in fold0["per_query"]} == {"q1", "q4"} and fold0["fold"] == 0
    assert {r["query_id"] for r in fold1["per_query"]} == {"q27"} and fold1["fold"] == 1
    assert fold1["selection"]["n_dev_queries"] == 2 and "registration" not in fold1
    tower1 = next(m for m in fold1["models"] if m["label"] == "tower")
    by_query0 = {r["query_id"]: r for r in fold0["per_query"] if r["model"] == "tower"}
    assert tower1["dev_ndcg@10"] == pytest.approx((by_query0["q1"]["ndcg@10"] + by_query0["q4"]["ndcg@10"]) / 2)

    assert pool_job.main(["--conf", conf, "--no-mlflow"]) == 0
    assert "pooled the test reports of folds [0, 1] (3 queries)" in capsys.readouterr().out
    pooled = json.loads((project.warehouse_path / "evaluation" / "report_test_folds.json").read_text())
    # the list each fold registers (here the one trained model) is pooled as `registered`
    assert [m["label"] for m in pooled["models"]] == ["bm25", "tower", "registered"]
    registered = next(m for m in pooled["models"] if m["label"] == "registered")
    assert registered["chosen_by_fold"] == {"0": "tower", "1": "tower"}
    assert registered["metrics"]["all"]["ndcg@10"] == next(m for m in pooled["models"] if m["label"] == "tower")["metrics"]["all"]["ndcg@10"]
    assert [(f["fold"], f["n_queries"]) for f in pooled["folds"]] == [(0, 2), (1, 1)]
    rows = [r for r in fold0["per_query"] + fold1["per_query"] if r["model"] == "tower"]
    tower = next(m for m in pooled["models"] if m["label"] == "tower")
    assert tower["metrics"]["all"]["n_queries"] == 3
    assert tower["metrics"]["all"]["ndcg@10"]["mean"] == pytest.approx(np.mean([r["ndcg@10"] for r in rows]))
    paired = next(c for c in pooled["comparisons"] if c["model"] == "tower" and c["metric"] == "ndcg@10")
    assert paired["against"] == "bm25" and paired["diff"]["n"] == 3
    assert "Pooled over folds" in (project.warehouse_path / "evaluation" / "report_test_folds.md").read_text()
    # a report of another split in a fold's place, or a query in both folds, cannot be pooled
    with pytest.raises(FoldReportError, match="query 'q1' is in the test reports of folds 0 and 1"):
        from lab.folds import pool
        pool({0: fold0, 1: {**fold1, "per_query": fold1["per_query"] + fold0["per_query"][:1]}}, 10, 0.95, 13)
    with pytest.raises(FoldReportError, match="split 'dev'"):
        pool({0: fold0, 1: {**fold1, "split": "dev"}}, 10, 0.95, 13)


    # rotations: every rotation's pooled folds as one report over the base warehouse
    assert pool_job.main(["--conf", conf, "--rotations", "--no-mlflow"]) == 0
    assert "pooled the folds of rotations [0] (3 queries; no pooled folds yet for rotation(s) [1, 2, 3])" in capsys.readouterr().out
    rotated = {**pooled, "per_query": [{**r, "query_id": "r1-" + str(r["query_id"])} for r in pooled["per_query"]]}
    rotation1 = project.warehouse_path / "rotations" / "rotation1" / "evaluation" / "report_test_folds.json"
    rotation1.parent.mkdir(parents=True)
    rotation1.write_text(json.dumps(rotated))
    assert pool_job.main(["--conf", conf, "--rotations", "--no-mlflow"]) == 0
    capsys.readouterr()
    both = json.loads((project.warehouse_path / "evaluation" / "report_test_rotations.json").read_text())
    assert [(r["rotation"], r["n_queries"]) for r in both["rotations"]] == [(0, 3), (1, 3)]
    assert both["rotations_missing"] == [2, 3] and both["inputs"]["n_queries_evaluated"] == 6
    tower = next(m for m in both["models"] if m["label"] == "tower")
    assert tower["metrics"]["all"]["ndcg@10"]["mean"] == pytest.approx(np.mean([r["ndcg@10"] for r in rows]))
    assert next(m for m in both["models"] if m["label"] == "registered")["chosen_by_rotation"] == {
        "0": {"0": "tower", "1": "tower"}, "1": {"0": "tower", "1": "tower"}}
    by_fold = next(m for m in pooled["models"] if m["label"] == "tower")["dev_ndcg@10_by_fold"]
    assert by_fold and tower["dev_ndcg@10_by_rotation"] == {"0": by_fold, "1": by_fold}  # each rotation's fold figures
    assert next(c for c in both["comparisons"] if c["model"] == "tower" and c["metric"] == "ndcg@10")["diff"]["n"] == 6
    text = (project.warehouse_path / "evaluation" / "report_test_rotations.md").read_text()
    assert "Pooled over rotations" in text and "rotation 1: 3 test queries" in text and "not yet run: rotation(s) [2, 3]" in text
    from lab.folds import pool_rotations
    with pytest.raises(FoldReportError, match="is held out in rotations 0 and 1"):
        pool_rotations({0: pooled, 1: pooled}, 10, 0.95, 13)
    with pytest.raises(FoldReportError, match="only pooled-folds test reports are pooled"):
        pool_rotations({0: pooled, 1: fold1}, 10, 0.95, 13)
    with pytest.raises(FoldReportError, match="no rotation has pooled folds yet"):
        pool_rotations({}, 10, 0.95, 13)


def test_a_pooled_model_says_what_each_of_its_models_was_trained_on():
    from lab.folds import _pooled_spec
    from annomine.evaluation.report import model_table

    specs = [{"name": "curriculum", "training_pairs": {"mined": 2820}},
             {"name": "curriculum", "training_pairs": {"mined": 1000, "human": 400}}]
    spec = _pooled_spec(specs, [0, 1], "fold")
    assert spec["training_pairs"] == {"human": 200, "mined": 1910}
    assert spec["training_pairs_by_fold"] == {"0": {"mined": 2820}, "1": {"mined": 1000, "human": 400}}
    assert spec["trained_models"] == [{"mined": 2820}, {"mined": 1000, "human": 400}]
    # rotations pool pooled folds: the mean is over every model behind them, each rotation's figure beside it
    other = _pooled_spec([{"name": "curriculum", "training_pairs": {"mined": 100}}] * 2, [0, 1], "fold")
    rotations = _pooled_spec([spec, other], [0, 1], "rotation")
    assert len(rotations["trained_models"]) == 4 and rotations["training_pairs"] == {"human": 100, "mined": 1005}
    assert rotations["training_pairs_by_rotation"] == {"0": spec["training_pairs"], "1": {"mined": 100}}
    assert "training_pairs_by_fold" not in rotations
    assert _pooled_spec([{"baseline": True}, {"baseline": True}], [0, 1], "fold") == {"baseline": True}
    assert _pooled_spec([{"name": "x"}, {"name": "x"}], [0, 1], "rotation")["training_pairs"] is None
    metrics = {k: {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6} for k in ("ndcg@10", "ndcg@10_judged", "lowest_share@10",
                                                                           "recall@100_top")}
    row = model_table({"models": [{"label": "curriculum", "spec": spec, "metrics": {"all": {
        **metrics, "n_queries": 3, "judged_share@10": 0.5, "n_queries_without_judged_top10": 0}}}]})[-1]
    assert row.endswith("| 1910 / 200 (mean of 2 models) |")


def test_each_fold_pools_the_list_its_registration_would_choose():
    from lab.folds import REGISTERED, with_registered

    def spec(label, **kw):
        base = {"label": label, "kind": "dense", "source": label, "path": None, "model_uri": None, "baseline": False,
                "two_tower": False, "training_pairs": None, "fusion": None, "rerank": None}
        return {**base, **kw}

    models = [{"label": "bm25", "spec": spec("bm25", kind="bm25", baseline=True), "dev_ndcg@10": 0.95},
              {"label": "curriculum", "spec": spec("curriculum", two_tower=True), "dev_ndcg@10": 0.80},
              {"label": "human", "spec": spec("human", two_tower=True), "dev_ndcg@10": 0.99},
              {"label": "best+ce", "spec": spec("best+ce", two_tower=True, rerank="ce"), "dev_ndcg@10": 0.86},
              {"label": "ranked", "spec": spec("ranked", kind="ranked"), "dev_ndcg@10": 0.85},
              {"label": "minilm+bm25", "spec": spec("minilm+bm25", baseline=True, fusion="rrf"), "dev_ndcg@10": 0.97}]
    per_query = [{"model": m["label"], "query_id": q, "ndcg@10": i / 10 + j / 100}
                 for i, m in enumerate(models) for j, q in enumerate(["q1", "q2"])]
    report = {"models": models, "per_query": per_query}
    out = with_registered(report, references=("human",))   # `human` is a reference, never registered
    chosen = next(m for m in out["models"] if m["label"] == REGISTERED)
    assert chosen["chosen"] == "best+ce" and chosen["dev_ndcg@10"] == 0.86
    assert [r["ndcg@10"] for r in out["per_query"] if r["model"] == REGISTERED] == [0.3, 0.31]
    assert len(report["models"]) == 6  # the fold's own report is left as it was
    # with `ranked` ahead on dev the ranked list is the fold's final output; nothing to register: no such row
    models[4]["dev_ndcg@10"] = 0.90
    assert next(m for m in with_registered(report, ("human",))["models"] if m["label"] == REGISTERED)["chosen"] == "ranked"
    only_baselines = {"models": models[:1], "per_query": per_query[:2]}
    assert with_registered(only_baselines) == only_baselines
