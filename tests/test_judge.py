"""Tier-1 judge: metrics, calibration, cascade decisions, tiny cross-encoder train/save/load, and the
`annomine judge train|eval` CLI on files in the CrowdFlower layout (tiny random BERT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from annomine.judges.calibration import NEVER, Calibrator, fit_calibrator
from annomine.judges.cascade import Cascade
from annomine.judges.cross_encoder import CrossEncoderModel, CrossEncoderSettings, build_encoder, train_cross_encoder
from annomine.judges.data import assign_splits, grading_metrics, load_pairs_from_files, quadratic_weighted_kappa
from annomine.judges.llm import TierResult
from tests.conftest import printed_summary, write_tsv

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


def _decide(outs, combiner=None):
    cascade = Cascade(GRADES, [], {}, 1)
    cascade.combiner = combiner
    return cascade._decide(outs, None, "escalated" if len(outs) > 1 else None)


def _dist(grade, p):
    return {g: (p if g == grade else (1 - p) / 3) for g in GRADES}


def test_cascade_decisions_without_a_combiner_the_first_tier_decides():
    # No fitted combination: an escalated pair keeps the first tier's grade, whatever the LLM tiers said (they
    # are recorded in tier_outputs); neither a "sure" later tier nor a majority overrules it.
    sure = _decide({"tier1": TierResult(grade=3, confidence=0.6, sure=False), "tier2": TierResult(grade=4, confidence=0.9, sure=True)})
    assert (sure["grade"], sure["deciding_tier"], sure["confidence"]) == (3, "tier1", 0.6)
    assert set(json.loads(sure["tier_outputs"])) == {"tier1", "tier2"} and sure["escalation"] == "escalated"
    majority = _decide({"tier1": TierResult(grade=3, confidence=0.6), "tier2": TierResult(grade=4, confidence=0.5),
                        "tier3": TierResult(grade=4, confidence=0.4)})
    assert (majority["grade"], majority["deciding_tier"]) == (3, "tier1")
    # A tier that failed is not outvoted by the others: the pair carries the failure and no grade.
    outage = _decide({"tier1": TierResult(grade=2, confidence=0.55), "tier2": TierResult(grade=4, confidence=0.7),
                      "tier3": TierResult(error="HTTP 500 (after 4 attempt(s))")})
    assert outage["grade"] is None and "tier3: HTTP 500" in outage["error"]
    failed = _decide({"tier2": TierResult(error="timeout"), "tier3": TierResult(error="malformed")})
    assert failed["grade"] is None and "tier2: timeout" in failed["error"] and "tier3: malformed" in failed["error"]
    alone = _decide({"tier1": TierResult(grade=1, confidence=0.3, sure=False)})
    assert (alone["grade"], alone["deciding_tier"], alone["escalation"]) == (1, "tier1", None)


def test_cascade_decisions_with_a_combiner_and_its_fit():
    from annomine.judges.combiner import Combiner, distribution, fit_path

    rng = np.random.default_rng(0)
    n = 400
    truth = rng.choice(GRADES, n, p=[0.2, 0.2, 0.2, 0.4])
    groups = (np.arange(n) // 8).astype(str)
    # tier 1: right 45% of the time; tier 2 (a strong LLM): right 85%; tier 2 (a weak one): always 4
    t1 = np.where(rng.random(n) < 0.45, truth, rng.choice(GRADES, n))
    strong = np.where(rng.random(n) < 0.85, truth, rng.choice(GRADES, n))
    d1 = np.stack([distribution({"grade": g, "probs": _dist(g, 0.6)}, GRADES) for g in t1])
    d_strong = np.stack([distribution({"grade": g, "probs": _dist(g, 0.8)}, GRADES) for g in strong])
    d_weak = np.stack([distribution({"grade": 4, "probs": _dist(4, 0.9)}, GRADES) for _ in range(n)])
    kept, report = fit_path([d1, d_strong], t1, truth, groups, ["tier1", "tier2"], GRADES)
    assert kept is not None and report["kept"] and report["scored"] == "out-of-fold by query"
    assert report["combined"]["quadratic_weighted_kappa"] > report["first_tier"]["quadratic_weighted_kappa"] + 0.2
    dropped, report_weak = fit_path([d1, d_weak], t1, truth, groups, ["tier1", "tier2"], GRADES)
    assert dropped is None and not report_weak["kept"] and "tier1 decides" in report_weak["reason"]
    few, report_few = fit_path([d1[:10], d_strong[:10]], t1[:10], truth[:10], groups[:10], ["tier1", "tier2"], GRADES)
    assert few is None and "too few pairs" in report_few["reason"]
    # used by the cascade: the combination decides the pairs whose consulted tiers match its path
    comb = Combiner(GRADES, {"tiers": []}, {"tier1+tier2": kept})
    again = Combiner.from_dict(json.loads(json.dumps(comb.to_dict())))
    pair = {"tier1": TierResult(grade=2, confidence=0.5, probs=_dist(2, 0.6)), "tier2": TierResult(grade=4, confidence=0.6, probs=_dist(4, 0.9))}
    out = _decide(pair, again)
    assert (out["grade"], out["deciding_tier"]) == (4, "combined") and 0.25 < out["confidence"] <= 1.0
    # a path without a kept combination (tier 3 consulted too): the first tier decides
    pair3 = dict(pair, tier3=TierResult(grade=4, confidence=0.6, probs=_dist(4, 0.9)))
    assert (_decide(pair3, again)["grade"], _decide(pair3, again)["deciding_tier"]) == (2, "tier1")
    # a tier without log-probabilities enters with its grade at raw_confidence, the rest spread evenly
    assert distribution(TierResult(grade=3, raw_confidence=0.7), GRADES).tolist() == pytest.approx([0.1, 0.1, 0.7, 0.1])


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
    # fold 1 swaps dev and test; train and calibration (the judge's data) stay as they are
    swap = {"dev": "test", "test": "dev", "train": "train", "calibration": "calibration"}
    assert assign_splits(pairs, 0.3, fold=1).tolist() == assign_splits(pairs, 0.3).map(swap).tolist()
    # another rotation holds out another block: its judge trains and calibrates without those queries
    from annomine.splits import split_of
    rotated = pairs.assign(s=assign_splits(pairs, 0.3, rotation=1))
    held = rotated[rotated.s.isin(["dev", "test"])]
    assert len(held) and set(held.query_id) == {q for q in pairs.query_id if split_of(q, rotation=1) != "train"}
    assert not set(held.query_id) & set(pairs.query_id[assign_splits(pairs, 0.3).isin(["dev", "test"])])
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


def _varied_pairs(tmp_path):
    """The tiny shop's pairs with product texts of varied length (some past the judge's 32 tokens)."""
    shop = _shop(tmp_path)
    pairs = load_pairs_from_files(shop / "queries.tsv", shop / "labels.tsv", shop / "products.tsv")
    extra = np.random.default_rng(3).integers(0, 30, len(pairs))
    return pairs.assign(text=[t + " extra" * int(k) for t, k in zip(pairs["text"], extra)])


def _tokenised_per_batch(model: CrossEncoderModel, queries: list[str], texts: list[str]):
    """The straightforward encoding: the tokenizer called on each batch with padding=True."""
    texts = [t[: model.max_text_chars] for t in texts] if model.max_text_chars else texts
    return model.tokenizer(queries, texts, padding=True, truncation="only_second", max_length=model.max_length,
                           return_tensors="pt")


def test_pairs_tokenised_once_pad_to_the_tokenizers_own_batches(tmp_path):
    pairs = _varied_pairs(tmp_path)
    tok, bert = build_encoder("tiny")
    model = CrossEncoderModel(tok, bert, GRADES, max_length=32, max_text_chars=150)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    tokens = model.tokens(queries, texts)
    assert tokens.lengths().max() == 32 and tokens.lengths().min() < 20
    assert np.all(np.diff(tokens.lengths()[tokens.by_length()]) >= 0)
    rng = np.random.default_rng(0)
    for size in (1, 5, 16, len(pairs)):
        idx = rng.permutation(len(pairs))[:size]
        fast = tokens.batch(idx)
        plain = _tokenised_per_batch(model, [queries[i] for i in idx], [texts[i] for i in idx])
        assert set(fast) == set(plain)
        for name in plain:
            assert fast[name].dtype == plain[name].dtype and fast[name].tolist() == plain[name].tolist(), name


def test_fast_judge_paths_give_the_straightforward_grades(tmp_path, monkeypatch):
    """Training on pairs tokenised once equals training that tokenises every batch; grading in token-length
    order equals grading each batch in input order: same probabilities (1e-5), grades and QWK."""
    import torch

    from annomine.judges import cross_encoder

    pairs = _varied_pairs(tmp_path)
    queries, texts, truth = pairs["query"].tolist(), pairs["text"].tolist(), pairs["grade"].to_numpy()
    settings = CrossEncoderSettings(base_model="tiny", max_length=32, max_text_chars=150, epochs=2, batch_size=8,
                                    learning_rate=2e-3, head_learning_rate=5e-3, threads=1)
    fast, _ = train_cross_encoder(pairs, GRADES, settings, progress=False)

    class PerBatch:  # tokenises each training batch again, every epoch
        def __init__(self, model, q, t):
            self.model, self.q, self.t = model, q, t

        def batch(self, idx):
            return _tokenised_per_batch(self.model, [self.q[i] for i in idx], [self.t[i] for i in idx])

    with monkeypatch.context() as m:
        m.setattr(cross_encoder.CrossEncoderModel, "tokens", lambda self, q, t: PerBatch(self, q, t))
        plain, _ = train_cross_encoder(pairs, GRADES, settings, progress=False)
    for a, b in zip(fast.bert.parameters(), plain.bert.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.inference_mode():
        straight = np.concatenate([torch.softmax(fast.logits(_tokenised_per_batch(fast, queries[s:s + 7], texts[s:s + 7])), -1).numpy()
                                   for s in range(0, len(pairs), 7)])
    probs = fast.ce_proba(queries, texts, batch_size=16)
    assert np.abs(probs - straight).max() < 1e-5
    assert np.abs(plain.ce_proba(queries, texts) - probs).max() < 1e-5
    for rule in ("argmax", "expected"):
        assert fast.decide(probs, rule).tolist() == fast.decide(straight, rule).tolist()
        assert quadratic_weighted_kappa(truth, fast.decide(probs, rule), GRADES) == quadratic_weighted_kappa(
            truth, fast.decide(straight, rule), GRADES)


def test_biencoder_in_token_length_order_gives_the_input_order_embeddings(tmp_path):
    """The stack's cosine feature encodes its texts in batches of similar token counts: each text's embedding
    is the one of batches in input order padded by the tokenizer (1e-6), cached texts included."""
    import torch

    from annomine.bert import mean_pool
    from annomine.judges.stack import BiEncoder

    texts = _varied_pairs(tmp_path)["text"].tolist()[:40]
    bi = BiEncoder("tiny", max_length=32, batch_size=8)
    with torch.inference_mode():
        straight = []
        for s in range(0, len(texts), 8):
            enc = bi.tokenizer(texts[s:s + 8], padding=True, truncation=True, max_length=32, return_tensors="pt")
            pooled = mean_pool(bi.bert(**enc).last_hidden_state, enc["attention_mask"])
            straight.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    straight = np.concatenate(straight)
    assert len({len(bi.tokenizer(t)["input_ids"]) for t in texts}) > 3  # lengths vary: the order matters
    assert np.abs(bi.encode(texts[:25]) - straight[:25]).max() < 1e-6
    assert np.abs(bi.encode(texts) - straight).max() < 1e-6  # 25 from the cache, 15 new


def test_judge_train_and_eval_cli(tmp_path, capsys):
    from jobs import judge

    shop = _shop(tmp_path / "shop", n_queries=16, per_query=8)
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"""
project: {{warehouse: {tmp_path / 'wh'}, mlflow_experiment: test-judge, schema: t_{tmp_path.name.replace('-', '_')}}}
judge:
  model: {{base_model: tiny, max_length: 32, epochs: 3, batch_size: 16, learning_rate: 0.002, head_learning_rate: 0.005, threads: 1,
          stack: true, stack_biencoder: tiny}}
  calibration_fraction: 0.3
  target_agreement: 0.8
  refit_on_all: true
  ranking_baseline: tiny
  cascade: {{tier1: true}}
""")
    files = ["--queries", str(shop / "queries.tsv"), "--labels", str(shop / "labels.tsv"), "--products", str(shop / "products.tsv")]
    assert judge.main(["train", "--conf", str(conf), *files]) == 0
    trained = printed_summary(capsys, tmp_path / "wh", "judge_train")
    folder = Path(trained["path"])  # a new folder of this run, published by current.json
    assert folder.parent == tmp_path / "wh" / "judges" and folder.name.startswith(trained["version"] + ".")
    assert json.loads((folder.parent / "current.json").read_text())["path"] == folder.name  # relative
    assert not [p for p in (folder.parent / "_staging").iterdir() if p.is_dir()], "nothing left in staging"
    for name in ("judge.json", "head.pt", "calibration_tier1.json", "metrics.json", "encoder/config.json",
                 "confusion_dev_tier1.png", "calibration_dev_tier1.png", "predictions_calibration.parquet", "predictions_dev.parquet"):
        assert (folder / name).exists(), name
    meta = json.loads((folder / "judge.json").read_text())
    assert meta["decision"] == trained["decision"] and len(meta["cutpoints"]) == 3 and meta["refit_on_all"] is True
    assert meta["kind"] == "stacked-cross-encoder" and (folder / "stack.json").exists() and (folder / "biencoder" / "config.json").exists()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["trained_on"] == "train + calibration" and metrics["history"]["refit"]["train_pairs"] > metrics["history"]["train_pairs"]
    for key in ("positive_precision", "positive_recall", "negative_precision", "negative_recall", "pairs_per_s"):
        assert key in trained["dev_tier1"], key
    # the judge's order of each dev query's labelled products against the zero-shot bi-encoder's, paired
    ranking = trained["dev_tier1"]["ranking"]
    assert ranking["n_queries"] == trained["dev_tier1"]["n_queries"] and ranking["baseline"] == "tiny"
    assert sum(seg["n_queries"] for seg in ranking["by_segment"].values()) == ranking["n_queries"]
    assert ranking["diff"]["mean"] == pytest.approx(ranking["judge_ndcg@10"]["mean"] - ranking["baseline_ndcg@10"]["mean"])
    logged = {f.name for f in (tmp_path / "wh" / "mlartifacts").rglob("*.png")}  # the MLflow run's artifacts
    assert {"confusion_dev_tier1.png", "calibration_dev_tier1.png"} <= logged, logged
    import mlflow

    from annomine.config import ProjectConfig

    mlflow.set_tracking_uri(ProjectConfig(warehouse=str(tmp_path / "wh")).tracking_uri)
    run = mlflow.search_runs(experiment_names=["test-judge"], output_format="list")[0]
    assert run.data.metrics["dev_ranking_ndcg10_diff"] == pytest.approx(ranking["diff"]["mean"])
    assert json.loads((tmp_path / "wh" / "judges" / "current.json").read_text())["version"] == trained["version"]
    assert judge.main(["eval", "--conf", str(conf), *files, "--judge", str(folder)]) == 0
    out = printed_summary(capsys, tmp_path / "wh", "judge_eval")
    for key in ("exact_agreement", "quadratic_weighted_kappa", "confusion_matrix", "escalation_rate", "share_per_tier",
                "positive_precision", "negative_recall", "pairs_per_s"):
        assert key in out
    assert out["n_pairs"] == 128 and out["share_per_tier"]["tier1"] == 1.0 and out["judge_version"] == trained["version"]
    assert out["ranking"]["n_queries"] == 16 and out["ranking"]["judge_score"] == "tier1 expected grade"
    # the cascade with loopback LLM tiers, nothing fitted for them: pairs escalate, and tier 1 still decides
    llm = ["--set", "judge.cascade.loopback.embedded=true", "--set", "judge.cascade.tier2={model: rule-small}",
           "--set", "judge.cascade.tier3={model: rule-large}"]
    assert judge.main(["eval", "--conf", str(conf), *files, *llm]) == 0
    casc = printed_summary(capsys, tmp_path / "wh", "judge_eval")
    assert casc["n_graded"] == 128 and casc["escalation_rate"] > 0 and casc["llm_calls"] > 0
    assert sum(casc["share_per_tier"].values()) == pytest.approx(1.0) and casc["share_per_tier"]["tier1"] == 1.0
    assert casc["quadratic_weighted_kappa"] == pytest.approx(casc["first_tier_alone"]["quadratic_weighted_kappa"])
    # an LLM as the first tier: the ranking check measures its order (its expected grade from the log-probabilities)
    assert judge.main(["eval", "--conf", str(conf), *files, *llm[:4], "--set", "judge.cascade.tier1=false"]) == 0
    alone = printed_summary(capsys, tmp_path / "wh", "judge_eval")
    assert alone["tiers"] == ["tier2"] and alone["ranking"]["judge_score"] == "tier2 expected grade"
    # calibrate fits the LLM tiers on at most llm_calibration_pairs pairs, the least sure first, and the combiner:
    # the loopback rule (word overlap) is what the toy grades follow, so the combination beats tier 1 and is used
    # (on a larger shop of the same kind: 64 calibration pairs, 8 queries, of which 48 go to the LLM tiers)
    big = _shop(tmp_path / "big", n_queries=64, per_query=8)
    big_files = ["--queries", str(big / "queries.tsv"), "--labels", str(big / "labels.tsv"), "--products", str(big / "products.tsv")]
    assert judge.main(["calibrate", "--conf", str(conf), *big_files, "--judge", str(folder), *llm,
                       "--set", "judge.llm_calibration_pairs=48"]) == 0
    cal = printed_summary(capsys, tmp_path / "wh", "judge_calibrate")
    assert cal["tier2"]["graded"] == cal["tier3"]["graded"] == 48 and "least sure" in cal["tier2"]["pairs"]
    assert "tier1+tier2" in cal["combiner"]["kept"], cal["combiner"]
    assert json.loads(open(cal["combiner"]["path"]).read())["paths"]
    assert judge.main(["eval", "--conf", str(conf), *big_files, "--judge", str(folder), *llm, "--llm-alone", "20"]) == 0
    fitted = printed_summary(capsys, tmp_path / "wh", "judge_eval")
    assert fitted["share_per_tier"]["combined"] > 0 and fitted["judge_version"] != casc["judge_version"]
    assert fitted["tiers_alone_on_sample"]["tier2"]["pairs"] == 20 and "tier1" in fitted["tiers_alone_on_sample"]


def test_judge_train_keeps_its_labelled_pairs_distributions_for_the_rank_stage(tmp_path, capsys):
    """The judge stage stores what the published judge gives its calibration, dev and test pairs in the tier-1 score cache
    that rank and `best+ce` read: the published judge's own distributions there, so rank scores none of them again."""
    from annomine.ranking.tier1 import Tier1Scores, cache_folder, pair_key
    from jobs import judge

    shop = _shop(tmp_path / "shop", n_queries=16, per_query=8)
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"""
project: {{warehouse: {tmp_path / 'wh'}, mlflow_experiment: test-judge-keep, schema: t_{tmp_path.name.replace('-', '_')}}}
judge:
  model: {{base_model: tiny, max_length: 32, epochs: 1, batch_size: 16, threads: 1, stack: true, stack_biencoder: tiny}}
  calibration_fraction: 0.3
  log_mlflow: false
  cascade: {{tier1: true}}
""")
    files = ["--queries", str(shop / "queries.tsv"), "--labels", str(shop / "labels.tsv"), "--products", str(shop / "products.tsv")]
    assert judge.main(["train", "--conf", str(conf), *files]) == 0
    folder = Path(printed_summary(capsys, tmp_path / "wh", "judge_train")["path"])
    cache = cache_folder(tmp_path / "wh" / "cache")
    kept = pd.read_parquet(next(cache.glob("*.parquet")))
    pairs = load_pairs_from_files(shop / "queries.tsv", shop / "labels.tsv", shop / "products.tsv")
    seen = pd.concat([pd.read_parquet(f) for f in folder.glob("predictions_*.parquet")])  # calibration, dev, test
    part = pairs.merge(seen[["query_id", "product_id"]], on=["query_id", "product_id"])
    assert len(part) == len(seen) and len(kept) == len({pair_key(q, t) for q, t in zip(part["query"], part["text"])})
    scores = Tier1Scores(folder, cache)
    from_cache = scores.probs(part["query"].tolist(), part["text"].tolist())
    assert scores.scored == 0  # every pair the judge stage graded is found
    np.testing.assert_allclose(from_cache, scores.model.predict_proba(part["query"].tolist(), part["text"].tolist()),
                               atol=1e-6)
    # a damaged cache is the rank stage's to rebuild: the judge stage still publishes its judge
    next(cache.glob("*.parquet")).write_bytes(b"not parquet")
    assert judge.main(["train", "--conf", str(conf), *files]) == 0


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


# ---- decision rule: cut-points on the expected grade ----------------------------------------------
def test_cutpoints_apply_fit_and_cross_validate():
    from annomine.judges.calibration import apply_cutpoints, cross_validated_cutpoints, cutpoint_objective, fit_cutpoints

    assert apply_cutpoints([1.0, 2.2, 2.9, 3.0, 3.9], [2.0, 3.0, 3.5], GRADES).tolist() == [1, 2, 2, 3, 4]
    with pytest.raises(ValueError, match="3 cut-points"):
        apply_cutpoints([1.0], [2.0], GRADES)
    # a score squeezed towards the mean (as an expected grade is): midpoints under-use grades 1 and 4
    rng = np.random.default_rng(3)
    truth = rng.choice(GRADES, 1200, p=[0.1, 0.15, 0.15, 0.6])
    score = 2.9 + 0.3 * (truth - 2.9) + rng.normal(0, 0.12, len(truth))
    cuts = fit_cutpoints(score, truth, GRADES)
    assert cuts == sorted(cuts) and len(cuts) == 3
    fitted = cutpoint_objective(truth, apply_cutpoints(score, cuts, GRADES), GRADES)
    midpoints = cutpoint_objective(truth, apply_cutpoints(score, [1.5, 2.5, 3.5], GRADES), GRADES)
    assert fitted > midpoints + 0.2
    assert fitted == pytest.approx(quadratic_weighted_kappa(truth, apply_cutpoints(score, cuts, GRADES), GRADES))
    exact = fit_cutpoints(score, truth, GRADES, objective="exact")
    assert cutpoint_objective(truth, apply_cutpoints(score, exact, GRADES), GRADES, "exact") >= \
        cutpoint_objective(truth, apply_cutpoints(score, cuts, GRADES), GRADES, "exact")
    groups = np.arange(len(truth)) // 40
    oof = cross_validated_cutpoints(score, truth, groups, GRADES)
    assert set(oof) <= set(GRADES) and quadratic_weighted_kappa(truth, oof, GRADES) > midpoints + 0.1


def test_positive_negative_precision_recall():
    m = grading_metrics([4, 4, 3, 2, 1, 1], [4, 2, 3, 3, 1, None], GRADES)
    # graded: truth 4,4,3,2,1 / pred 4,2,3,3,1 -> positives (>= 3): TP 2, predicted 3, true 3
    assert m["positive_precision"] == pytest.approx(2 / 3) and m["positive_recall"] == pytest.approx(2 / 3)
    assert m["negative_precision"] == pytest.approx(1 / 2) and m["negative_recall"] == pytest.approx(1 / 2)
    assert m["positive_min_grade"] == 3


def test_cutpoint_decision_is_saved_loaded_and_selected(tmp_path):
    from annomine.judges.cross_encoder import select_decision

    tok, bert = build_encoder("tiny")
    model = CrossEncoderModel(tok, bert, GRADES, max_length=16, decision="cutpoints", version="ce-cut",
                              max_text_chars=12, cutpoints=[1.8, 2.6, 3.2])
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.4, 0.3], [0.0, 0.1, 0.2, 0.7]])
    expected = probs @ np.array(GRADES)  # 1.6, 2.9, 3.6
    assert model.decide(probs).tolist() == [1, 3, 4]
    assert model.decide(probs, "argmax").tolist() == [1, 3, 4] and model.decide(probs, "expected").tolist() == np.rint(expected).astype(int).tolist()
    # the text is cut before tokenising, so a long description does not change the input
    a = model.tokens(["red shoes"], ["Red shoes | " + "x" * 500]).batch([0])["input_ids"]
    b = model.tokens(["red shoes"], ["Red shoes | " + "y" * 500]).batch([0])["input_ids"]
    assert a.tolist() == b.tolist()
    model.save(tmp_path / "j")
    meta = json.loads((tmp_path / "j" / "judge.json").read_text())
    assert meta["decision"] == "cutpoints" and meta["cutpoints"] == [1.8, 2.6, 3.2] and meta["max_text_chars"] == 12
    again = CrossEncoderModel.load(tmp_path / "j")
    assert again.decide(probs).tolist() == [1, 3, 4] and again.max_text_chars == 12
    with pytest.raises(ValueError, match="no cut-points"):
        CrossEncoderModel(tok, bert, GRADES, decision="cutpoints").decide(probs)
    # selection on held-out pairs: cut-points are fitted and scored out-of-fold by query
    rng = np.random.default_rng(4)
    truth = rng.choice(GRADES, 400, p=[0.1, 0.15, 0.15, 0.6])
    p4 = np.clip(0.45 + 0.12 * (truth - 3) + rng.normal(0, 0.05, 400), 0.01, 0.97)
    many = np.stack([(1 - p4) * 0.3, (1 - p4) * 0.3, (1 - p4) * 0.4, p4], axis=1)
    out = select_decision(again, many, truth, groups=np.arange(400) // 20)
    assert out["decision"] in ("argmax", "expected", "cutpoints") and len(out["cutpoints"]) == 3
    assert out["cutpoints_scored"] == "out-of-fold by query"
    assert set(out["validation"]) == {"argmax", "expected", "cutpoints"}
    assert select_decision(again, many, truth, rule="argmax")["decision"] == "argmax"
    with pytest.raises(ValueError, match="unknown decision rule"):
        select_decision(again, many, truth, rule="median")


def test_length_bucketed_batches_cover_each_pair_once():
    from annomine.judges.cross_encoder import _batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, 1000)
    for bucketing in (True, False):
        batches = _batches(np.random.default_rng(1), lengths, 16, bucketing, window=10)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(1000)) and max(len(b) for b in batches) == 16
    spread = np.mean([np.ptp(lengths[b]) for b in _batches(np.random.default_rng(1), lengths, 16, True, window=10)])
    assert spread < 0.5 * np.mean([np.ptp(lengths[b]) for b in _batches(np.random.default_rng(1), lengths, 16, False)])


# ---- stacked judge features ---------------------------------------------------------------------
def test_stack_features_and_stacker():
    from annomine.judges.stack import Bm25Scorer, bm25_scores, coverage, fit_stacker, relative_features, stack_features, title_of

    assert coverage("red shoes", "Red shoe | leather") == 1.0 and coverage("red shoes", "Blue shoes") == 0.5
    assert coverage("", "anything") == 0.0 and title_of("Lamp | a lamp | desc") == "Lamp"
    rel = relative_features(np.array([1.0, 2.0, 3.0, 5.0, 5.0]), np.array(["a", "a", "a", "b", "b"]))
    assert rel["rank"].tolist() == [0.0, 0.5, 1.0, 0.5, 0.5] and rel["gap"].tolist() == [-2.0, -1.0, 0.0, 0.0, 0.0]
    assert rel["z"][:3].mean() == pytest.approx(0.0) and rel["z"][3:].tolist() == [0.0, 0.0]
    rng = np.random.default_rng(7)
    rows, truth = [], []
    for q in range(24):
        for j in range(12):
            g = int(rng.choice(GRADES, p=[0.15, 0.15, 0.2, 0.5]))
            rows.append({"query_id": str(q), "query": f"red thing{q}", "product_id": f"p{q}_{j}",
                         "text": (f"red thing{q} deluxe" if g >= 3 else f"blue widget{j}") + " | a product"})
            truth.append(g)
    df = pd.DataFrame(rows)
    truth = np.array(truth)
    scorer = Bm25Scorer(df["product_id"].tolist(), df["text"].tolist())
    bm25 = bm25_scores(df, scorer)
    assert (bm25[truth >= 3].mean() > bm25[truth <= 2].mean()) and bm25.min() >= 0.0
    p4 = np.clip(0.5 + 0.1 * (truth - 3) + rng.normal(0, 0.1, len(truth)), 0.02, 0.96)
    probs = np.stack([(1 - p4) / 3] * 3 + [p4], axis=1)
    feats = stack_features(df, probs, GRADES, bm25=bm25)
    for col in ("ce_p4", "ce_expected", "bm25", "cosine", "title_coverage", "ce_expected_z", "bm25_rank", "query_size"):
        assert col in feats.columns, col
    assert feats["cosine"].eq(0).all() and not stack_features(df, probs, GRADES, relative=False).columns.str.endswith("_z").any()
    for kind in ("hgb", "logreg"):
        st = fit_stacker(feats, truth, df["query_id"], GRADES, kind=kind)
        assert len(st.cutpoints) == 3 and set(st.predict(feats)) <= set(GRADES)
        assert st.cv["quadratic_weighted_kappa"] > 0.3, (kind, st.cv)
    with pytest.raises(ValueError, match="unknown stacker"):
        fit_stacker(feats, truth, df["query_id"], GRADES, kind="forest")


def test_stacked_tier1_features_save_and_load(tmp_path):
    from annomine.judges.cross_encoder import attach_stack
    from annomine.judges.stack import JUDGE_FEATURES, BiEncoder, LogisticStack, fit_logistic_stack, pair_features

    shop = _shop(tmp_path)
    pairs = load_pairs_from_files(shop / "queries.tsv", shop / "labels.tsv", shop / "products.tsv")
    tok, bert = build_encoder("tiny")
    model = CrossEncoderModel(tok, bert, GRADES, max_length=32, version="ce-stack")
    ce = model.ce_proba(pairs["query"].tolist(), pairs["text"].tolist())
    bi = BiEncoder("tiny")
    cos = bi.cosine(pairs["query"].tolist(), pairs["text"].tolist())
    assert cos.shape == (len(pairs),) and np.all(np.abs(cos) <= 1 + 1e-6)
    assert np.allclose(bi.cosine(pairs["query"].tolist()[:3], pairs["text"].tolist()[:3]), cos[:3], atol=1e-6)  # cached
    feats = pair_features(pairs["query"].tolist(), pairs["text"].tolist(), ce, GRADES, bi)
    assert list(feats.columns) == JUDGE_FEATURES
    # the toy grades follow title overlap: coverage alone separates them, so the stack learns them
    stack, oof = fit_logistic_stack(feats, pairs["grade"], pairs["query_id"], GRADES)
    assert oof.shape == (len(pairs), 4) and np.allclose(oof.sum(axis=1), 1.0)
    assert quadratic_weighted_kappa(pairs["grade"], np.array(GRADES)[oof.argmax(axis=1)], GRADES) > 0.5
    again = LogisticStack.from_dict(json.loads(json.dumps(stack.to_dict())))
    assert np.allclose(again.predict_proba(feats, GRADES), stack.predict_proba(feats, GRADES))
    # attached to the judge: predict_proba is the stack's distribution, and it survives save / load
    out = attach_stack(model, pairs, ce, CrossEncoderSettings(base_model="tiny", stack=True, stack_biencoder="tiny"))
    assert out["oof_probs"].shape == (len(pairs), 4) and set(out["coefficients"]) == set(JUDGE_FEATURES)
    probs = model.predict_proba(pairs["query"].tolist(), pairs["text"].tolist())
    assert not np.allclose(probs, ce)
    model.cutpoints, model.decision = [1.5, 2.5, 3.5], "cutpoints"
    model.save(tmp_path / "judge")
    loaded = CrossEncoderModel.load(tmp_path / "judge")
    assert np.allclose(loaded.predict_proba(pairs["query"].tolist(), pairs["text"].tolist()), probs, atol=1e-5)
    assert loaded.decide(probs).tolist() == model.decide(probs).tolist()


def test_tier1_takes_given_product_vectors_instead_of_encoding_the_texts(tmp_path):
    """`grade_frame`'s `text_vector` column (the ANN channel's vectors, in the annotate job) goes to the stack's
    bi-encoder: the texts given a vector are not encoded, a row without one (or with one of another width) is, and
    the grades and probabilities are those of encoding every text. Only the bundled model's vectors are shared with product_embeddings."""
    from annomine.judges.cascade import TEXT_VECTOR, Cascade, Tier1
    from annomine.judges.cross_encoder import attach_stack, load_cached
    from annomine.judges.stack import BiEncoder, shared_vector_key

    shop = _shop(tmp_path)
    pairs = load_pairs_from_files(shop / "queries.tsv", shop / "labels.tsv", shop / "products.tsv")
    tok, bert = build_encoder("tiny")
    model = CrossEncoderModel(tok, bert, GRADES, max_length=32, version="ce-vectors")
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    attach_stack(model, pairs, model.ce_proba(queries, texts), CrossEncoderSettings(base_model="tiny", stack=True,
                                                                                     stack_biencoder="tiny"))
    model.save(tmp_path / "judge")
    Calibrator.uncalibrated(GRADES, 0.5).save(tmp_path / "judge" / "calibration_tier1.json")
    expected = Cascade(GRADES, [Tier1(tmp_path / "judge", GRADES)], {"tier1": Calibrator.uncalibrated(GRADES, 0.5)}, 1)
    plain = expected.grade_frame(pairs[["query", "text"]])
    bi = load_cached(tmp_path / "judge").biencoder
    vectors = [v for v in bi.encode(texts)]
    bi._cache.clear()
    encoded: list[str] = []
    real_encode = BiEncoder.encode

    def spy(self, batch):
        encoded.extend(t for t in batch if t not in self._cache)
        return real_encode(self, batch)

    missing, damaged = texts[0], next(t for t in texts if t != texts[0])  # rows without a vector / a vector too short
    given_vectors = [None if t == missing else v[:3] if t == damaged else v for t, v in zip(texts, vectors)]
    frame = pairs[["query", "text"]].assign(**{TEXT_VECTOR: given_vectors})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BiEncoder, "encode", spy)
        given = expected.grade_frame(frame)
    assert {missing, damaged} <= set(encoded) and not (set(texts) - {missing, damaged}) & set(encoded)
    assert given["grade"].tolist() == plain["grade"].tolist()
    for a, b in zip(given["tier_outputs"], plain["tier_outputs"]):
        pa, pb = json.loads(a)["tier1"]["probs"], json.loads(b)["tier1"]["probs"]
        assert max(abs(pa[k] - pb[k]) for k in pa) <= 1e-4
    # attach_stack caches the known vectors before it computes the calibration pairs' features
    encoded.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BiEncoder, "encode", spy)
        again = CrossEncoderModel(tok, bert, GRADES, max_length=32, version="ce-vectors")
        attach_stack(again, pairs, model.ce_proba(queries, texts), CrossEncoderSettings(
            base_model="tiny", stack=True, stack_biencoder="tiny"), known_vectors=dict(zip(texts, vectors)))
    assert encoded and not set(texts) & set(encoded)  # the queries only
    assert expected.text_vector_key is None  # the random 'tiny' bi-encoder is saved with the judge: its own weights
    assert shared_vector_key({"base_model": "minilm", "max_length": 64}) == "minilm@64"
    assert shared_vector_key({"base_model": "minilm", "folder": "biencoder", "max_length": 64}) is None
    assert shared_vector_key(None) is None


def test_ranking_headroom_scores_both_orders_of_the_same_products():
    from annomine.judges.ranking import order_by_score, ranking_headroom

    # two queries, four labelled products each; the judge orders them by grade, the baseline in reverse on query a
    pairs = pd.DataFrame({"query_id": ["a"] * 4 + ["b"] * 4, "product_id": [f"p{i}" for i in range(8)],
                          "grade": [4, 3, 2, 1, 4, 1, 1, 1]})
    judge = np.array([4.0, 3.0, 2.0, 1.0, 3.5, 1.0, 1.0, 1.0])
    baseline = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.1, 0.1, 0.1])
    out = ranking_headroom(pairs, judge, baseline, 1, 4, n_resamples=200)
    assert out["n_queries"] == 2 and out["judge_ndcg@10"]["mean"] == pytest.approx(1.0)
    assert out["baseline_ndcg@10"]["mean"] < 1.0 and out["diff"]["mean"] > 0
    assert (out["judge_wins"], out["baseline_wins"]) == (1, 0)  # query b: both put its one relevant product first
    assert out["ratio"] == pytest.approx(1.0 / out["baseline_ndcg@10"]["mean"])
    by = ranking_headroom(pairs, judge, baseline, 1, 4, n_resamples=50, segments=pd.Series({"a": "head", "b": "tail"}))
    assert by["by_segment"]["head"]["n_queries"] == 1 and by["by_segment"]["head"]["judge_wins"] == 1
    assert by["by_segment"]["tail"]["diff"]["mean"] == pytest.approx(0.0)
    # ties are broken by product id, so the order does not depend on the row order
    assert order_by_score(["q", "q", "q"], ["c", "a", "b"], [1.0, 1.0, 2.0]) == {"q": ["b", "a", "c"]}
    # a query with nothing above the lowest grade has no NDCG and is left out
    flat = pd.concat([pairs, pd.DataFrame({"query_id": ["c", "c"], "product_id": ["x", "y"], "grade": [1, 1]})])
    assert ranking_headroom(flat, np.r_[judge, 1, 2], np.r_[baseline, 1, 2], 1, 4, n_resamples=50)["n_queries"] == 2


def test_a_missing_ranking_baseline_is_refused_at_config_time(tmp_path):
    from annomine.config import ConfigError
    from jobs import judge

    conf = tmp_path / "conf.yaml"
    conf.write_text(f"project: {{warehouse: {tmp_path / 'wh'}}}\njudge: {{ranking_baseline: {tmp_path / 'nope'}}}\n")
    judge.JudgeConfig(ranking_baseline="").validate()  # empty: the check is skipped
    with pytest.raises(ConfigError, match=r"conf.yaml:judge: ranking_baseline: no model folder '.*nope'"):
        judge.main(["train", "--conf", str(conf)])


def test_the_ranking_check_reuses_the_judge_s_own_bi_encoder():
    """The stack's cosine feature is the same model: its embedding cache already holds the pairs, so no second copy."""
    from types import SimpleNamespace

    from annomine.judges.stack import BIENCODER_MAX_LENGTH, BiEncoder
    from jobs.judge import JudgeConfig, _ranking_baseline

    own = BiEncoder("tiny")
    assert _ranking_baseline(JudgeConfig(ranking_baseline="tiny"), SimpleNamespace(biencoder=own)) is own
    shorter = SimpleNamespace(biencoder=BiEncoder("tiny", max_length=32))
    loaded = _ranking_baseline(JudgeConfig(ranking_baseline="tiny"), shorter)
    assert loaded is not shorter.biencoder and loaded.max_length == BIENCODER_MAX_LENGTH
    assert _ranking_baseline(JudgeConfig(ranking_baseline=""), SimpleNamespace(biencoder=own)) is None
