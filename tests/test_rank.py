"""The rank stage: polarized labels by hand, features for an unseen query, train + apply on a tiny shop, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from annomine.evaluation.catalog import Catalog, EncodeSettings, ModelSpec
from annomine.ranking.features import FeatureSettings, FeatureSources, build_features, columns_of
from annomine.ranking.labels import POLARIZED_LEVELS, polarize, quantise, relevance
from annomine.ranking.tier1 import Tier1Scores
from annomine.tracking import ensure_experiment
from tests.test_evaluate import PRODUCTS, _conf, tiny_model, write_shop  # noqa: F401 - fixtures reused

GRADES = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    import torch

    from annomine.judges.cross_encoder import CrossEncoderModel, build_encoder

    torch.manual_seed(0)
    tok, bert = build_encoder("tiny")
    folder = tmp_path_factory.mktemp("judges") / "ce-ranktest"
    CrossEncoderModel(tok, bert, GRADES, max_length=32, version="ce-ranktest").save(folder)
    return folder


# ---- labels ------------------------------------------------------------------------------------------------
def test_polarization_by_hand():
    # expected grades 1, 2.5, 4 on the 1..4 scale are x = 0, 0.5, 1; steepness 8, centre 0.5:
    # 1 / (1 + e^4) = 0.017986, 1 / (1 + e^0) = 0.5, 1 / (1 + e^-4) = 0.982014
    s = polarize([1.0, 2.5, 4.0], 1, 4, steepness=8, centre=0.5)
    assert s == pytest.approx([0.017986, 0.5, 0.982014], abs=1e-6)
    # a centre at grade 3 (x = 2/3) pushes a 2.5 down: 1 / (1 + e^(8 * (2/3 - 1/2))) = 1 / (1 + e^(4/3)) = 0.208609
    assert polarize([2.5], 1, 4, 8, 2 / 3)[0] == pytest.approx(0.208609, abs=1e-6)
    # levels: s * 30 rounded: 0.54 -> 1, 15 -> 15, 29.46 -> 29
    assert quantise(s).tolist() == [1, 15, 29]
    frame = pd.DataFrame({"judge_grade": [1, 4, 3], "judge_expected": [1.0, 2.5, 4.0], "human_grade": [np.nan, 2, np.nan]})
    levels, gains = relevance(frame, "polarized", 1, 4, 8, 0.5)
    assert levels.tolist() == [1, 15, 29] and gains == [float(g) for g in range(POLARIZED_LEVELS + 1)]
    assert relevance(frame, "raw", 1, 4)[0].tolist() == [0, 3, 2]
    assert relevance(frame, "human", 1, 4)[0].tolist() == [0, 1, 2]  # the human grade where the pair has one
    assert relevance(frame, "raw", 1, 4)[1] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="steepness and a centre"):
        relevance(frame, "polarized", 1, 4)


def test_a_ranker_started_from_the_cross_encoder_corrects_its_order(tmp_path):
    from annomine.ranking.model import Ranker, RankerParams
    from annomine.ranking.training import LabelChoice, fit_one, label_choices

    rng = np.random.default_rng(0)
    rows = [(f"q{q}", f"p{q}_{i}", rng.uniform(1, 4), rng.normal()) for q in range(30) for i in range(8)]
    frame = pd.DataFrame(rows, columns=["query_id", "product_id", "ce_expected", "noise"])
    frame["judge_grade"] = np.clip(np.rint(frame["ce_expected"]), 1, 4)
    params = RankerParams(n_estimators=1, learning_rate=1e-6, min_child_samples=1, num_leaves=2, subsample=1.0,
                          colsample_bytree=1.0, threads=1)
    started = fit_one(frame, ["noise"], LabelChoice("raw", start="ce"), params, 1, 4, seed=0)
    plain = fit_one(frame, ["noise"], LabelChoice("raw"), params, 1, 4, seed=0)
    trees = np.asarray(started.booster.predict(frame[["noise"]].to_numpy()))
    # the score is the cross-encoder's expected grade plus the trees' (here nearly zero) correction
    assert started.score(frame) == pytest.approx(frame["ce_expected"].to_numpy() + trees)
    assert np.abs(trees).max() < 1e-3 and np.corrcoef(started.score(frame), frame["ce_expected"])[0, 1] > 0.9999
    assert abs(np.corrcoef(plain.score(frame), frame["ce_expected"])[0, 1]) < 0.5  # a noise-only ranker does not
    started.save(tmp_path, "ranker")
    loaded = Ranker.load(tmp_path, "ranker")
    assert loaded.start == "ce" and loaded.score(frame) == pytest.approx(started.score(frame))
    with pytest.raises(ValueError, match="needs the feature column 'ce_expected'"):
        loaded.score(frame.drop(columns=["ce_expected"]))
    names = [c.name for c in label_choices(["raw", "polarized"], [8.0], [0.5], ("zero", "ce"))]
    assert names == ["raw", "polarized(steepness=8,centre=0.5)", "raw from ce", "polarized(steepness=8,centre=0.5) from ce"]


def test_label_choices_fitted_at_once_are_the_rankers_fitted_one_at_a_time():
    from annomine.ranking.model import RankerParams
    from annomine.ranking.training import fit_and_select, label_choices

    rng = np.random.default_rng(1)
    rows = [(f"q{q}", f"p{q}_{i}", rng.uniform(1, 4), rng.normal(), rng.normal()) for q in range(24) for i in range(12)]
    frame = pd.DataFrame(rows, columns=["query_id", "product_id", "judge_expected", "signal", "noise"])
    frame["signal"] += frame["judge_expected"]
    frame["judge_grade"] = np.clip(np.rint(frame["judge_expected"]), 1, 4)
    frame["human_grade"] = np.nan
    train = frame[frame["query_id"].isin([f"q{q}" for q in range(18)])].reset_index(drop=True)
    dev = frame[~frame["query_id"].isin(train["query_id"])].reset_index(drop=True)
    dev_labels = dev.assign(grade=dev["judge_grade"].astype(int))[["query_id", "product_id", "grade"]]
    choices = label_choices(["raw", "polarized"], [4.0, 8.0], [0.5, 0.67], ("zero",))
    fits = {}
    for at_once in (1, 3):
        params = RankerParams(n_estimators=20, num_leaves=4, min_child_samples=2, threads=2, fits_at_once=at_once)
        fits[at_once] = fit_and_select(train, dev, dev_labels, ["signal", "noise"], choices, params, 1, 4, seed=13)
    (one, chosen_one, found_one), (many, chosen_many, found_many) = fits[1], fits[3]
    assert found_many == found_one and chosen_many == chosen_one
    assert [r["choice"] for r in found_many] == [c.name for c in choices]  # logged and recorded in the choices' order
    assert np.array_equal(many.score(frame), one.score(frame))
    with pytest.raises(ValueError, match="fits_at_once >= 1"):
        RankerParams(fits_at_once=0).validate()


# ---- features ----------------------------------------------------------------------------------------------
def test_features_of_an_unseen_query_come_from_the_catalog_and_the_models(tmp_path, tiny_model, tiny_judge):
    from annomine.evaluation.inputs import file_product_text

    ids = [p[0] for p in PRODUCTS]
    texts = [file_product_text(p[1], p[2])[1] for p in PRODUCTS]
    catalog = Catalog(ids, texts)
    tier1 = Tier1Scores(tiny_judge, tmp_path / "tier1")
    sources = FeatureSources(catalog, ModelSpec("tower", "folder", str(tiny_model), path=str(tiny_model)), tier1,
                             EncodeSettings(), tmp_path / "emb")
    settings = FeatureSettings(top_k=10, channel_k=3)
    # a query that is in no table, no log and no label file
    frame = build_features(sources, ["new"], ["blue ceramic teapot"], settings, segments={"new": "tail"})
    assert len(frame) == 10 and frame["retriever_rank"].tolist() == list(range(1, 11))
    assert sorted(frame["product_id"]) == sorted(ids)
    assert set(columns_of(settings.groups, GRADES)) <= set(frame.columns)
    by_id = frame.set_index("product_id")
    bm25 = dict(zip(ids, catalog.bm25.scores("blue ceramic teapot")))
    assert by_id["bm25_score"].to_dict() == pytest.approx(bm25)
    # ranks only within each channel's top 3; a product BM25 scores 0 is not retrieved by it
    assert by_id["bm25_rank"].notna().sum() == 3 and math.isnan(by_id.loc["p10", "bm25_rank"])
    assert by_id["ann_rank"].dropna().sort_values().tolist() == [1.0, 2.0, 3.0]
    assert by_id.loc["p1", "lexical_rank"] == 1.0   # the only title with every term (blue, ceramic, teapot)
    # coverage by hand: p1's title "Zanzibar teapot, blue ceramic" has all 3 terms, p3's "Glass teapot" 1 of 3
    assert by_id.loc["p1", "title_coverage"] == 1.0 and by_id.loc["p3", "title_coverage"] == pytest.approx(1 / 3)
    assert (frame["query_terms"] == 3).all() and (frame["query_segment"] == 2).all()
    probs = frame[[f"ce_p{j}" for j in range(1, 5)]].to_numpy()
    assert probs.sum(axis=1) == pytest.approx(np.ones(10))
    assert frame["ce_expected"].to_numpy() == pytest.approx(probs @ np.array(GRADES))
    assert frame[["tier2_expected", "tier3_expected"]].isna().all().all()   # no LLM grade for an unseen pair
    assert tier1.scored == 10
    # tier 1 scores only what it has not scored: a second process reads the cache
    again = Tier1Scores(tiny_judge, tmp_path / "tier1")
    assert np.allclose(again.probs(frame["query"].tolist(), frame["text"].tolist()), probs) and again.scored == 0


# ---- train + apply, the CLI --------------------------------------------------------------------------------
def _rank_conf(tmp_path, project) -> str:
    conf = tmp_path / "rank.yaml"
    conf.write_text(open(_conf(tmp_path, project)).read() + (
        "rank:\n  features: {top_k: 10, channel_k: 5}\n  steepness: [8]\n  centres: [0.5, 0.67]\n"
        "  calibration_fraction: 0.8\n"  # q3, the one train query, is then also the judge's calibration query
        "  ranker: {n_estimators: 20, min_child_samples: 1, num_leaves: 4, threads: 1}\n"))
    return str(conf)


def test_rank_trains_publishes_and_evaluate_ranks_outside_files(ctx, tmp_path, tiny_model, tiny_judge, capsys):
    from annomine.judges.store import set_current
    from jobs import evaluate, ingest, rank

    shop = write_shop(tmp_path / "shop")
    sources = ingest.crowdflower_sources(str(shop))
    ingest.run(ctx, ingest.IngestConfig(products=sources["products"], queries=sources["queries"], labels=sources["labels"]))
    warehouse = ctx.project.warehouse_path
    import shutil

    shutil.copytree(tiny_judge, warehouse / "judges" / "ce-ranktest")
    set_current(warehouse, "ce-ranktest")
    (warehouse / "models").mkdir(parents=True)
    (warehouse / "models" / "best.json").write_text(json.dumps({"variant": "curriculum", "path": str(tiny_model)}))
    conf = _rank_conf(tmp_path, ctx.project)

    assert rank.main(["--conf", conf, "--set", "rank.mlflow=false", "--set", "rank.ablations=true"]) == 0
    out = capsys.readouterr().out
    assert "rank: chose" in out and "dev NDCG@10 ranked-no-ce" in out
    pointer = json.loads((warehouse / "rankers" / "current.json").read_text())
    assert pointer["path"] == f"rankers/{pointer['version']}"   # relative to the warehouse
    folder = warehouse / pointer["path"]
    meta = json.loads((folder / "rank.json").read_text())
    assert meta["judge_path"] == "judges/ce-ranktest" and meta["selection"]["n_train_queries"] == 1
    # raw, human and polarized at two centres, trained on the train and on the calibration queries, compared on dev
    labels = ["raw", "polarized(steepness=8,centre=0.5)", "polarized(steepness=8,centre=0.67)", "human"]
    assert [(c["train_queries"], c["choice"]) for c in meta["selection"]["choices"]] == [
        *(("train", label) for label in labels), *(("calibration", label) for label in labels)]
    assert {p.name for p in folder.iterdir()} >= {"ranker.txt", "ablation_raw.txt", "ablation_no_ce.txt",
                                                  "feature_importance.png", "rank.json"}
    no_ce = json.loads((folder / "ablation_no_ce.json").read_text())["columns"]
    assert not any(c.startswith("ce_") for c in no_ce) and "bm25_score" in no_ce

    report_file = tmp_path / "out" / "report.json"
    rc = evaluate.main(["--conf", conf, "--models", "best,best+ce,ranked,ranked-no-ce",
                        "--products", str(shop / "products.tsv"), "--queries", str(shop / "queries.tsv"),
                        "--labels", str(shop / "labels.tsv"), "--split", "all", "--out", str(report_file), "--no-mlflow"])
    assert rc == 0
    report = json.loads(report_file.read_text())
    assert [m["label"] for m in report["models"]] == ["best", "best+ce", "ranked", "ranked-no-ce"]
    rows = pd.DataFrame(report["per_query"])
    for query_id in ("q1", "q27", "q3", "q4"):
        lists = rows[rows["query_id"] == query_id].set_index("model")["top10_ids"]
        # the reranked lists reorder the retriever's own top 10 (the whole tiny catalog)
        assert sorted(lists["ranked"]) == sorted(lists["best"]) == sorted(lists["best+ce"])
    against = {(c["model"], c["against"], c["metric"]) for c in report["comparisons"]}
    assert {("ranked", "best", "ndcg@10"), ("ranked", "best+ce", "ndcg@10"), ("ranked", "best", "lowest_share@10"),
            ("ranked-no-ce", "best+ce", "ndcg@10")} <= against
    assert report["models"][2]["retrieval"]["retriever"].startswith("ranked: ranked (LambdaMART")


def test_rank_without_a_judge_is_one_line_naming_the_pointer(ctx, tmp_path, tiny_model, capsys):
    from annomine.cli import guarded
    from jobs import ingest, rank

    shop = write_shop(tmp_path / "shop")
    sources = ingest.crowdflower_sources(str(shop))
    ingest.run(ctx, ingest.IngestConfig(products=sources["products"], queries=sources["queries"], labels=sources["labels"]))
    (ctx.project.warehouse_path / "models").mkdir(parents=True)
    (ctx.project.warehouse_path / "models" / "best.json").write_text(json.dumps({"path": str(tiny_model)}))
    assert guarded("annomine rank", rank.main, ["--conf", _rank_conf(tmp_path, ctx.project)]) == 2
    err = capsys.readouterr().err
    assert f"annomine rank: error: no trained judge: {ctx.project.warehouse_path / 'judges' / 'current.json'}" in err


def test_an_unknown_label_choice_is_a_config_error_naming_the_key(tmp_path, project, capsys):
    from annomine.cli import guarded
    from jobs import rank

    conf = _rank_conf(tmp_path, project)
    assert guarded("annomine rank", rank.main, ["--conf", conf, "--set", "rank.labels=[clicks]"]) == 2
    assert f"annomine rank: error: {conf}:rank: labels must name one or more of ['raw', 'polarized', 'human'], " \
           "got ['clicks']" in capsys.readouterr().err


def test_the_registered_pyfunc_serves_retriever_and_ranker_together(tmp_path, tiny_model, tiny_judge):
    import gc
    import tempfile
    import time

    import mlflow

    started = time.time() - 1

    from annomine.evaluation.inputs import catalog_from_file
    from annomine.ranking import store
    from annomine.ranking.apply import rank_with
    from annomine.ranking.serving import log_ranked_model
    from annomine.ranking.training import LabelChoice, fit_one
    from annomine.ranking.model import RankerParams

    catalog, _ = catalog_from_file(str(write_shop(tmp_path / "shop") / "products.tsv"))
    settings = FeatureSettings(top_k=10, channel_k=5)
    tier1 = Tier1Scores(tiny_judge)
    sources = FeatureSources(catalog, ModelSpec("tower", "folder", str(tiny_model), path=str(tiny_model)), tier1)
    frame = build_features(sources, ["q3", "q27"], ["16 gb memory card", "red kettle"], settings)
    frame["judge_grade"] = tier1.decide(frame[[f"ce_p{j}" for j in range(1, 5)]].to_numpy())
    ranker = fit_one(frame, columns_of(settings.groups, GRADES), LabelChoice("raw"),
                     RankerParams(n_estimators=10, min_child_samples=1, num_leaves=4, threads=1), 1, 4, seed=13)
    warehouse = tmp_path / "wh"
    folder = store.rankers_dir(warehouse) / "rank-test"
    ranker.save(folder, store.VARIANT_FILES["ranked"])
    (folder / store.META).write_text(json.dumps({
        "folder": "rankers/rank-test", "retriever": {"label": "tower", "kind": "folder", "source": str(tiny_model)},
        "retriever_path": str(tiny_model), "judge_path": str(tiny_judge), "features": {"top_k": 10, "channel_k": 5}}))
    published = store.from_folder(folder)
    expected, _ = rank_with(published, "ranked", catalog, ["zanzibar teapot", "wool socks"], EncodeSettings(), None, None)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ensure_experiment(mlflow.get_tracking_uri(), "rank-serving", str(tmp_path / "mlartifacts"))  # not ./mlruns
    with mlflow.start_run():
        uri = log_ranked_model(published, catalog).model_uri
    model = mlflow.pyfunc.load_model(uri)
    served = model.predict(pd.DataFrame({"query": ["zanzibar teapot", "wool socks"]}), params={"k": 5})
    assert [list(ids) for ids in served] == [ids[:5] for ids in expected]
    del model
    gc.collect()
    left = [p for p in Path(tempfile.gettempdir()).glob("annomine-ranked-*") if p.stat().st_mtime >= started]
    assert not left, f"the served model's catalog cache outlived it: {left}"


def test_the_two_tower_reranked_by_tier_1_is_served_as_one_model(tmp_path, tiny_model, tiny_judge):
    import mlflow

    from annomine.evaluation.inputs import catalog_from_file
    from annomine.model_specs import retrieve
    from annomine.registration import log_reranked_model

    catalog, _ = catalog_from_file(str(write_shop(tmp_path / "shop") / "products.tsv"))
    spec = ModelSpec("tower+ce", "folder", str(tiny_model), path=str(tiny_model), rerank=str(tiny_judge))
    queries = ["zanzibar teapot", "wool socks"]
    expected, _ = retrieve(spec, catalog, queries, 10, EncodeSettings(), tmp_path / "emb")
    plain, _ = retrieve(ModelSpec("tower", "folder", str(tiny_model), path=str(tiny_model)), catalog, queries, 10,
                        EncodeSettings(), tmp_path / "emb")
    assert [sorted(a) for a in expected] == [sorted(b) for b in plain]  # the same top 10, reordered by tier 1
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ensure_experiment(mlflow.get_tracking_uri(), "rerank-serving", str(tmp_path / "mlartifacts"))  # not ./mlruns
    with mlflow.start_run():
        uri = log_reranked_model(spec, catalog, top_k=10).model_uri
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"query": queries}), params={"k": 5})
    assert [list(ids) for ids in served] == [ids[:5] for ids in expected]


def test_the_final_model_is_the_list_with_the_best_dev_score(tiny_model, tiny_judge):
    from annomine.registration import final_choice, registration_candidates

    tower = ModelSpec("curriculum", "folder", "models/curriculum.json", path=str(tiny_model))
    specs = {"minilm": ModelSpec("minilm", "minilm", "minilm"), "curriculum": tower,
             "human": ModelSpec("human", "folder", "models/human.json", path=str(tiny_model)),
             "curriculum+bm25": ModelSpec("curriculum+bm25", "folder", "x", path=str(tiny_model), fusion="rrf:bm25"),
             "curriculum+ce": ModelSpec("curriculum+ce", "folder", "x", path=str(tiny_model), rerank=str(tiny_judge)),
             "minilm+ce": ModelSpec("minilm+ce", "minilm", "minilm", rerank=str(tiny_judge)),
             "ranked": ModelSpec("ranked", "ranked", "ranked", path="rankers/r"),
             "ranked-raw": ModelSpec("ranked-raw", "ranked", "ranked-raw", path="rankers/r")}

    def report(**dev):
        return {"models": [{"label": label, "dev_ndcg@10": dev.get(label.replace("+", "_").replace("-", "_"), 0.5)}
                           for label in specs]}

    def chosen(rep, with_lists=True):
        dev, kind, model, _ = final_choice(registration_candidates(rep, specs, ("human",), with_lists))
        return model["label"], kind

    # baselines, hybrids, references (human) and ablations never compete, however well they score on dev
    assert chosen(report(minilm=0.9, human=0.9, curriculum_bm25=0.9, minilm_ce=0.9, ranked_raw=0.9,
                         curriculum=0.6, curriculum_ce=0.5, ranked=0.5)) == ("curriculum", "two_tower")
    assert chosen(report(curriculum=0.6, curriculum_ce=0.7, ranked=0.65)) == ("curriculum+ce", "reranked")
    assert chosen(report(curriculum=0.6, curriculum_ce=0.7, ranked=0.75)) == ("ranked", "ranked")
    assert chosen(report(curriculum=0.7, curriculum_ce=0.7, ranked=0.7)) == ("curriculum", "two_tower")  # a tie: simpler
    assert chosen(report(curriculum=0.7, curriculum_ce=0.8, ranked=0.75), with_lists=False) == ("curriculum", "two_tower")


def test_calibration_fraction_must_match_the_judge_s_calibration_queries(tmp_path):
    from annomine.config import ConfigError
    from jobs.rank import RankConfig, check_calibration_queries

    judge = tmp_path / "ce-x"
    judge.mkdir()
    (judge / "metrics.json").write_text(json.dumps({"splits": {"calibration": {"pairs": 90, "queries": 32}}}))
    check_calibration_queries(judge, 32, RankConfig())
    with pytest.raises(ConfigError, match=r"rank.calibration_fraction 0.25 gives 30 calibration queries, but the judge "
                                          r"ce-x was calibrated on 32: set it to judge.calibration_fraction"):
        check_calibration_queries(judge, 30, RankConfig())
    check_calibration_queries(judge, 30, RankConfig(train_queries=["train"]))  # not used: nothing to check


def test_a_ranked_list_is_compared_with_every_other_list_once():
    from annomine.evaluation.metrics import compare_to_baselines, ranked_comparisons

    rows = pd.DataFrame([{"model": m, "query_id": q, "ndcg@10": v, "lowest_share@10": 0.0}
                         for q, values in {"a": (0.5, 0.6, 0.9), "b": (0.4, 0.7, 0.8), "c": (0.6, 0.5, 0.7)}.items()
                         for m, v in zip(("minilm", "best+ce", "ranked"), values)])
    known = compare_to_baselines(rows, ["minilm"], ["best+ce", "ranked"], 100)
    extra = ranked_comparisons(rows, ["ranked"], ["minilm", "best+ce", "ranked"], 100, known=known)
    assert {(c["against"], c["metric"]) for c in extra} == {("best+ce", "ndcg@10"), ("best+ce", "lowest_share@10")}
    against_ce = next(c for c in extra if c["metric"] == "ndcg@10")
    assert against_ce["model_mean"] == pytest.approx(0.8) and against_ce["baseline_mean"] == pytest.approx(0.6)
