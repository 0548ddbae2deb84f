"""Tier-1 judge: metrics, calibration, cascade decisions, tiny cross-encoder train/save/load, and the
`annomine judge train|eval` CLI on files in the CrowdFlower layout (tiny random BERT)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from annomine.judges.calibration import NEVER, Calibrator, fit_calibrator
from annomine.judges.cascade import Cascade
from annomine.judges.cross_encoder import CrossEncoderModel, CrossEncoderSettings, build_encoder, train_cross_encoder
from annomine.judges.data import assign_splits, grading_metrics, load_pairs_from_files, quadratic_weighted_kappa
from annomine.judges.llm import TierResult
from tests.conftest import write_tsv

GRADES = [1, 2, 3, 4]


def test_qwk_matches_sklearn_and_metrics_shape():
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 5, 300)
    pred = np.clip(truth + rng.integers(-1, 2, 300), 1, 4)
    assert quadratic_weighted_kappa(truth, pred, GRADES) == pytest.approx(cohen_kappa_score(truth, pred, weights="quadratic"))
    m = grading_metrics(truth, list(pred), GRADES)
    assert m["exact_agreement"] == pytest.approx(np.mean(truth == pred))
    assert np.array(m["confusion_matrix"]["rows_truth_cols_pred"]).sum() == 300
    assert grading_metrics([1, 2], [1, None], GRADES)["n_graded"] == 1


def test_qwk_on_a_hand_computed_example_and_degenerate_cases():
    # truth x pred counts O = [[1,1,0],[0,1,0],[0,0,1]], expected E = outer([2,1,1], [1,2,1]) / 4,
    # weights (i-j)^2: sum(w*O) = 1, sum(w*E) = 5, so kappa = 1 - 1/5; the ungraded pair is skipped
    assert quadratic_weighted_kappa([1, 1, 2, 3, 2], [1, 2, 2, 3, None], [1, 2, 3]) == pytest.approx(0.8)
    assert quadratic_weighted_kappa([2, 2], [2, 2], GRADES) == 1.0          # one grade throughout
    assert quadratic_weighted_kappa([1, 1], [2, 2], GRADES) == pytest.approx(0.0)
    assert np.isnan(quadratic_weighted_kappa([1, 2], [None, float("nan")], GRADES))


def test_isotonic_calibration_and_thresholds():
    rng = np.random.default_rng(1)
    n = 2000
    raw = rng.uniform(0.25, 1.0, n)
    pred = rng.integers(1, 5, n)
    correct = rng.uniform(0, 1, n) < raw ** 2          # over-confident raw scores
    truth = np.where(correct, pred, np.where(pred == 4, 1, pred + 1))
    cal = fit_calibrator(pred, raw, truth, GRADES, target_agreement=0.8)
    conf = cal.calibrate(pred, raw)
    for g in GRADES:  # monotone per class and closer to the true accuracy than the raw score
        m = pred == g
        order = np.argsort(raw[m])
        assert np.all(np.diff(conf[m][order]) >= -1e-12)
    assert abs(conf.mean() - correct.mean()) < abs(raw.mean() - correct.mean())
    sure = cal.is_sure(pred, conf)
    assert 0.05 < sure.mean() < 0.95 and correct[sure].mean() >= 0.78
    again = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.allclose(again.calibrate(pred, raw), conf)
    # a class that never reaches the target always escalates
    bad = fit_calibrator([2] * 50, np.linspace(0.3, 0.9, 50), [1] * 50, GRADES, 0.9)
    assert bad.threshold(2) == NEVER


def _decide(outs):
    return Cascade(GRADES, [], {}, 1)._decide(outs, None)


def test_cascade_escalation_and_vote():
    sure = _decide({"tier1": TierResult(grade=3, confidence=0.6, sure=False), "tier2": TierResult(grade=4, confidence=0.9, sure=True)})
    assert (sure["grade"], sure["deciding_tier"]) == (4, "tier2")
    vote = _decide({"tier1": TierResult(grade=3, confidence=0.6), "tier2": TierResult(grade=4, confidence=0.5),
                    "tier3": TierResult(grade=3, confidence=0.4)})
    assert (vote["grade"], vote["deciding_tier"]) == (3, "vote")
    tie = _decide({"tier1": TierResult(grade=2, confidence=0.55), "tier2": TierResult(grade=4, confidence=0.7)})
    assert (tie["grade"], tie["deciding_tier"]) == (4, "vote")  # tie -> highest probability
    # A tier that failed is not outvoted by the others: the pair carries the failure and no grade.
    outage = _decide({"tier1": TierResult(grade=2, confidence=0.55), "tier2": TierResult(grade=4, confidence=0.7),
                      "tier3": TierResult(error="HTTP 500 (after 4 attempt(s))")})
    assert outage["grade"] is None and "tier3: HTTP 500" in outage["error"]
    failed = _decide({"tier2": TierResult(error="timeout"), "tier3": TierResult(error="malformed")})
    assert failed["grade"] is None and "tier2: timeout" in failed["error"] and "tier3: malformed" in failed["error"]
    alone = _decide({"tier1": TierResult(grade=1, confidence=0.3, sure=False)})
    assert (alone["grade"], alone["deciding_tier"]) == (1, "tier1")


def _shop(tmp_path, n_queries=12, per_query=12):
    """A tiny CrowdFlower-layout shop whose grade follows word overlap (learnable)."""
    rng = np.random.default_rng(5)
    colours, things = ["red", "blue", "green", "black"], ["shoes", "lamp", "table", "phone", "chair", "mug"]
    queries, products, labels = [], [], []
    for q in range(n_queries):
        c, t = colours[q % 4], things[q % 6]
        queries.append([str(q), f"{c} {t}"])
        for j in range(per_query):
            pid = f"p{q}_{j}"
            kind = j % 4
            title = {0: f"{c} {t} deluxe", 1: f"{colours[(q + 1) % 4]} {t}", 2: f"{c} {things[(q + 1) % 6]}",
                     3: f"{colours[(q + 2) % 4]} {things[(q + 3) % 6]}"}[kind]
            products.append([pid, title, f"A {title} for your home."])
            labels.append([str(q), pid, [4, 3, 2, 1][kind], round(float(rng.uniform(0, 0.5)), 3)])
    write_tsv(tmp_path / "queries.tsv", ["query_id", "query"], queries)
    write_tsv(tmp_path / "products.tsv", ["product_id", "title", "description"], products)
    write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade", "variance"], labels)
    return tmp_path


def test_pairs_from_files_name_bad_rows(tmp_path):
    shop = _shop(tmp_path)
    pairs = load_pairs_from_files(shop / "queries.tsv", shop / "labels.tsv", shop / "products.tsv")
    assert len(pairs) == 144 and set(pairs.grade) == set(GRADES)
    assert set(assign_splits(pairs, 0.3)) <= {"train", "calibration", "dev", "test"}
    assert pairs.assign(s=assign_splits(pairs, 0.3)).groupby("query_id")["s"].nunique().max() == 1  # by query
    write_tsv(tmp_path / "bad.tsv", ["query_id", "product_id", "grade"], [["0", "p0_0", "4"], ["0", "p0_1", "7"]])
    with pytest.raises(ValueError, match=r"bad.tsv: row 3: grade '7'"):
        load_pairs_from_files(shop / "queries.tsv", tmp_path / "bad.tsv", shop / "products.tsv")
    write_tsv(tmp_path / "bad2.tsv", ["query_id", "product_id", "grade"], [["0", "nope", "4"]])
    with pytest.raises(ValueError, match="product_id 'nope' not found"):
        load_pairs_from_files(shop / "queries.tsv", tmp_path / "bad2.tsv", shop / "products.tsv")


def test_tiny_cross_encoder_learns_saves_and_loads(tmp_path):
    shop = _shop(tmp_path)
    pairs = load_pairs_from_files(shop / "queries.tsv", shop / "labels.tsv", shop / "products.tsv")
    settings = CrossEncoderSettings(base_model="tiny", max_length=32, epochs=6, batch_size=16, learning_rate=2e-3,
                                    head_learning_rate=5e-3, threads=1)
    model, history = train_cross_encoder(pairs, GRADES, settings, valid_df=pairs, progress=False)
    assert history["epochs"][-1]["loss"] < history["epochs"][0]["loss"]
    probs = model.predict_proba(pairs["query"].tolist(), pairs["text"].tolist())
    assert np.allclose(probs.sum(axis=1), 1.0)
    model.version = "ce-test"
    model.save(tmp_path / "judge")
    again = CrossEncoderModel.load(tmp_path / "judge")
    assert again.version == "ce-test" and again.decision == model.decision
    assert np.allclose(again.predict_proba(pairs["query"].tolist()[:8], pairs["text"].tolist()[:8]), probs[:8], atol=1e-5)
    # frozen-layer caching trains the same architecture
    tok, bert = build_encoder("tiny")
    assert len(bert.encoder.layer) == 2
    frozen = CrossEncoderSettings(base_model="tiny", max_length=32, epochs=1, freeze_layers=1, threads=1)
    m2, _ = train_cross_encoder(pairs.head(40), GRADES, frozen, progress=False)
    assert all(not p.requires_grad for p in m2.bert.embeddings.parameters())


def test_judge_train_and_eval_cli(tmp_path, capsys):
    from jobs import judge

    shop = _shop(tmp_path / "shop", n_queries=16, per_query=8)
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"""
project: {{warehouse: {tmp_path / 'wh'}, mlflow_experiment: test-judge}}
judge:
  model: {{base_model: tiny, max_length: 32, epochs: 3, batch_size: 16, learning_rate: 0.002, head_learning_rate: 0.005, threads: 1}}
  calibration_fraction: 0.3
  target_agreement: 0.8
  cascade: {{tier1: true}}
""")
    files = ["--queries", str(shop / "queries.tsv"), "--labels", str(shop / "labels.tsv"), "--products", str(shop / "products.tsv")]
    assert judge.main(["train", "--conf", str(conf), *files]) == 0
    trained = json.loads(capsys.readouterr().out)
    folder = tmp_path / "wh" / "judges" / trained["version"]
    for name in ("judge.json", "head.pt", "calibration_tier1.json", "metrics.json", "encoder/config.json"):
        assert (folder / name).exists(), name
    assert json.loads((tmp_path / "wh" / "judges" / "current.json").read_text())["version"] == trained["version"]
    assert judge.main(["eval", "--conf", str(conf), *files, "--judge", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("exact_agreement", "quadratic_weighted_kappa", "confusion_matrix", "escalation_rate", "share_per_tier"):
        assert key in out
    assert out["n_pairs"] == 128 and out["share_per_tier"]["tier1"] == 1.0 and out["judge_version"] == trained["version"]
    # the cascade with loopback LLM tiers: escalated pairs are settled by tier 2/3 or a vote
    assert judge.main(["eval", "--conf", str(conf), *files, "--set", "judge.cascade.loopback.embedded=true",
                       "--set", "judge.cascade.tier2={model: rule-small}", "--set", "judge.cascade.tier3={model: rule-large}"]) == 0
    casc = json.loads(capsys.readouterr().out)
    assert casc["n_graded"] == 128 and casc["escalation_rate"] > 0
    assert sum(casc["share_per_tier"].values()) == pytest.approx(1.0)
    assert casc["share_per_tier"]["tier1"] == pytest.approx(1.0 - casc["escalation_rate"])


def test_pairs_from_tables(ctx):
    from annomine.judges.data import load_pairs_from_tables
    from annomine.schemas import TABLES

    def rows(table, *dicts):
        return ctx.spark.createDataFrame([tuple(d.get(c) for c in TABLES[table].columns) for d in dicts], TABLES[table].schema)

    ctx.tables.overwrite("products", rows("products", {"product_id": "p1", "title": "Red shoes", "text": "Red shoes"},
                                          {"product_id": "p2", "title": "Lamp", "text": "Lamp"}))
    ctx.tables.overwrite("queries", rows("queries", {"query_id": "1", "query": "red shoes"}))
    ctx.tables.overwrite("human_labels", rows("human_labels", {"query_id": "1", "product_id": "p1", "grade": 4, "variance": 0.0},
                                              {"query_id": "1", "product_id": "p2", "grade": 1, "variance": 0.5}))
    pairs = load_pairs_from_tables(ctx.tables)
    assert pairs[["product_id", "text", "grade"]].values.tolist() == [["p1", "Red shoes", 4], ["p2", "Lamp", 1]]
