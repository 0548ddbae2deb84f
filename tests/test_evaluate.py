"""`annomine evaluate` end to end on a tiny shop: files and tables, BM25 and a tiny two-tower, MLflow."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from annomine.evaluation import metrics as M
from annomine.evaluation.inputs import InputError, catalog_from_file, catalog_from_table
from annomine.evaluation.catalog import EncodeSettings, ModelSpecError, catalog_embeddings
from annomine.model_specs import resolve_specs
from tests.conftest import write_tsv

PRODUCTS = [
    ["p1", "Zanzibar teapot, blue ceramic", "A <b>ceramic</b> teapot from the Zanzibar line."],
    ["p2", "Teapot cozy", "Knitted cozy for any teapot."],
    ["p3", "Glass teapot", ""],
    ["p4", "Red kettle", "Stainless steel kettle, red."],
    ["p5", "Blue kettle", "Stainless steel kettle, blue."],
    ["p6", "Red scarf", "Wool scarf in red."],
    ["p7", "Memory card 16 GB", "SD memory card, 16 GB."],
    ["p8", "Memory card 32 GB", "SD memory card, 32 GB."],
    ["p9", "Card game", "A family card game."],
    ["p10", "Wool socks", "Warm wool socks."],
]
# annomine.splits: q1 and q4 are test queries, q27 the dev (selection) query, q3 train.
QUERIES = [["q1", "zanzibar teapot", "50"], ["q27", "red kettle", "30"], ["q3", "16 gb memory card", "15"],
           ["q4", "wool socks", "5"]]
LABELS = [
    ["q1", "p1", "4", "0"], ["q1", "p2", "1", "0"], ["q1", "p3", "1", "0.2"],
    ["q27", "p4", "4", "0"], ["q27", "p5", "2", "0"], ["q27", "p5", "3", "0"],  # duplicate: mean 2.5 -> 3
    ["q27", "p6", "1", "0"],
    ["q3", "p7", "4", "0"], ["q3", "p8", "3", "0"], ["q3", "p9", "1", "0"],
    ["q4", "p10", "4", "0"], ["q4", "p6", "9", "0"],  # grade outside the scale: rejected, reported
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from annomine.two_tower import TwoTower

    folder = tmp_path_factory.mktemp("models") / "tiny_tower"
    TwoTower.tiny(hidden=32, layers=1, seed=3).save(folder)
    return folder


@pytest.fixture
def shop(tmp_path):
    return write_shop(tmp_path / "shop")


def write_shop(folder):
    """The tiny shop's products, queries and labels as TSV files in `folder`."""
    write_tsv(folder / "products.tsv", ["product_id", "title", "description"], PRODUCTS)
    write_tsv(folder / "queries.tsv", ["query_id", "query", "frequency"], QUERIES)
    write_tsv(folder / "labels.tsv", ["query_id", "product_id", "grade", "variance"], LABELS)
    return folder


def _conf(tmp_path, project) -> str:
    path = tmp_path / "eval.yaml"
    path.write_text(f"project:\n  warehouse: {project.warehouse}\n  schema: {project.schema}\n"
                    f"  mlflow_experiment: eval-test\nevaluate:\n  bootstrap_resamples: 200\n")
    return str(path)


def test_cli_on_files_with_bm25_and_two_tower(spark, project, tmp_path, shop, tiny_model, capsys, monkeypatch):
    import mlflow

    from jobs import evaluate

    monkeypatch.chdir(tmp_path)  # the experiment's artifacts go to the warehouse, never to ./mlruns
    out = tmp_path / "out" / "report.json"
    rc = evaluate.main(["--conf", _conf(tmp_path, project), "--models", f"bm25,tower={tiny_model},hybrid={tiny_model}+bm25",
                        "--products", str(shop / "products.tsv"), "--queries", str(shop / "queries.tsv"),
                        "--labels", str(shop / "labels.tsv"), "--split", "all", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [m["label"] for m in report["models"]] == ["bm25", "tower", "hybrid"]
    # the hybrid's list is the fusion of the two others' lists
    from annomine.model_specs import reciprocal_rank_fusion
    by = {(r["model"], r["query_id"]): r["top10_ids"] for r in report["per_query"]}
    assert report["models"][2]["retrieval"]["retriever"].startswith("hybrid: rrf:bm25")
    assert any(by[("hybrid", q)] != by[("tower", q)] for q in ("q1", "q27", "q3", "q4"))
    assert by[("hybrid", "q1")][:3] == reciprocal_rank_fusion([by[("tower", "q1")], by[("bm25", "q1")]], 10)[:3]
    report["models"] = report["models"][:2]
    report["per_query"] = [r for r in report["per_query"] if r["model"] != "hybrid"]
    assert report["segment_rule"].startswith("frequency")
    assert report["segment_counts"] == {"head": 1, "torso": 1, "tail": 2}
    assert report["inputs"]["n_queries_evaluated"] == 4
    assert report["inputs"]["n_rejected_label_rows"] == 1
    assert report["inputs"]["rejected_label_rows"][0]["reason"] == "grade outside 1..4"
    rows = {(r["model"], r["query_id"]): r for r in report["per_query"]}
    assert len(rows) == 8
    # BM25 ranks the only Zanzibar teapot first, then the two grade-1 teapots: ideal order.
    q1 = rows[("bm25", "q1")]
    assert q1["top10_ids"][0] == "p1" and q1["ndcg@10"] == pytest.approx(1.0)
    assert q1["judged@10"] == 3 and q1["lowest_share@10"] == pytest.approx(2 / 3)
    # The merged duplicate (grade 3) is what the top-10 grades show.
    assert 3 in rows[("bm25", "q27")]["top10_grades"]
    bm25 = report["models"][0]["metrics"]
    for metric in M.METRICS:
        est = bm25["all"][metric]
        assert est["ci_low"] <= est["mean"] <= est["ci_high"]
    assert set(bm25) >= {"all", "head", "torso", "tail"}
    tower = report["models"][1]
    assert tower["spec"]["two_tower"] and tower["retrieval"]["index"]["kind"] == "flat"
    assert all(len(rows[("tower", q)]["top10_ids"]) == 10 for q in ("q1", "q27", "q3", "q4"))  # whole catalog searched
    for name in ("report.md", "report_metrics.png", "report_grades_top10.png", "report_ndcg_vs_mined_pairs.png"):
        assert (out.parent / name).is_file()
    assert "| bm25 |" in out.with_suffix(".md").read_text()

    # MLflow: metrics logged, and the only two-tower registered with its evaluation attached.
    reg = report["registration"]
    assert reg["registered"] and reg["model"] == "tower"
    mlflow.set_tracking_uri(project.tracking_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.metrics["bm25/all/ndcg_at_10"] == pytest.approx(bm25["all"]["ndcg@10"]["mean"])
    assert not (tmp_path / "mlruns").exists() and run.info.artifact_uri.startswith(
        (project.warehouse_path / "mlartifacts").resolve().as_uri())
    version = mlflow.MlflowClient().get_model_version(reg["name"], reg["version"])
    assert version.tags["evaluation_json"].endswith("report.json")
    assert float(version.tags["ndcg_at_10"]) == pytest.approx(tower["metrics"]["all"]["ndcg@10"]["mean"], abs=1e-4)
    assert float(version.tags["dev_ndcg_at_10"]) == pytest.approx(tower["dev_ndcg@10"], abs=1e-4)

    # The registered model resolves back through its models:/ URI to the same weights.
    spec = resolve_specs(f"models:/{reg['name']}/{reg['version']}", project.warehouse, project.tracking_uri)[0]
    assert spec.two_tower and spec.model_uri.startswith("models:/")
    # A warehouse registry entry (`best`) resolves to the folder.
    registry = project.warehouse_path / "models"
    registry.mkdir(parents=True, exist_ok=True)
    (registry / "best.json").write_text(json.dumps({"path": str(tiny_model), "model_uri": None}))
    best = resolve_specs("best", project.warehouse)[0]
    assert best.label == "best" and best.path == str(tiny_model) and best.two_tower
    with pytest.raises(ModelSpecError, match=r"unknown model 'nope'.*known: \['best'\]"):
        resolve_specs("nope", project.warehouse)

    # The paired comparison: the two-tower against BM25 (the only baseline), on the same queries.
    ndcg = next(c for c in report["comparisons"] if c["metric"] == "ndcg@10")
    diffs = [rows[("tower", q)]["ndcg@10"] - rows[("bm25", q)]["ndcg@10"] for q in ("q1", "q27", "q3", "q4")
             if rows[("tower", q)]["ndcg@10"] is not None and rows[("bm25", q)]["ndcg@10"] is not None]
    assert ndcg["model"] == "tower" and ndcg["against"] == "bm25" and ndcg["diff"]["n"] == len(diffs)
    assert ndcg["diff"]["mean"] == pytest.approx(float(np.mean(diffs)))
    assert "paired over the same queries" in out.with_suffix(".md").read_text()

    # The pipeline ends by printing that table and the final model, read back from the files.
    from jobs import pipeline

    pipeline.print_outcome(project, _conf(tmp_path, project), [f"evaluate.out={out}", "evaluate.split=all"])
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ") and "[" in line}
    assert "free baseline" in rows["bm25"] and "<- registered (best on dev)" in rows["tower"] and "hybrid" in rows
    assert "Results on 4 all queries (every labelled query):" in printed
    assert "tower loses to the best baseline without training (bm25): NDCG@10 -" in printed
    assert f"pipeline's retriever (None): {tiny_model}" in printed and "annomine evaluate --model best" in printed


def test_default_split_is_test_and_registration_selects_on_dev(spark, project, tmp_path, shop, tiny_model, capsys):
    from annomine.splits import split_of
    from jobs import evaluate

    assert evaluate.EvaluateConfig().split == "test" and "test" in evaluate.SPLITS
    assert [split_of(q[0]) for q in QUERIES] == ["test", "dev", "train", "test"]
    files = ["--products", str(shop / "products.tsv"), "--queries", str(shop / "queries.tsv"), "--labels", str(shop / "labels.tsv")]
    everything = tmp_path / "all" / "report.json"
    assert evaluate.main(["--conf", _conf(tmp_path, project), "--models", f"tower={tiny_model}", *files, "--split", "all",
                          "--out", str(everything), "--no-mlflow"]) == 0
    per_query_all = {r["query_id"]: r for r in json.loads(everything.read_text())["per_query"]}
    capsys.readouterr()

    out = tmp_path / "test" / "report.json"
    # `human` (a reference, evaluate.compare_with) ties with `tower` on dev and comes first: never registered
    assert evaluate.main(["--conf", _conf(tmp_path, project), "--models", f"bm25,human={tiny_model},tower={tiny_model}",
                          *files, "--out", str(out)]) == 0  # no --split: the test split
    printed = capsys.readouterr().out
    assert "(split test: reporting only, never used for selection" in printed
    report = json.loads(out.read_text())
    assert report["split"] == "test" and "never used for selection" in report["split_role"]
    assert report["selection"]["split"] == "dev" and "test queries were never used for selection" in report["selection"]["note"]
    assert report["selection"]["n_dev_queries"] == 1
    # the dev split's make-up beside the report's: its one query is torso, so the choices never saw head or tail
    assert report["selection"]["segment_counts"] == {"head": 0, "torso": 1, "tail": 0}
    assert "the dev split (every training-time choice) holds no head/tail queries; this report has 1 head, 1 tail" in printed
    assert "in the dev split that made every training-time choice: {'head': 0, 'torso': 1, 'tail': 0}" in \
        out.with_suffix(".md").read_text()
    assert report["teacher"] is None and "The judge as a teacher" not in out.with_suffix(".md").read_text()  # no judge yet
    # Only test queries are reported; the dev query is ranked for the registration alone.
    assert {r["query_id"] for r in report["per_query"]} == {"q1", "q4"}
    assert report["inputs"]["n_queries_evaluated"] == 2
    assert {r["split"] for r in report["per_query"]} == {"test"}
    tower = next(m for m in report["models"] if m["label"] == "tower")
    assert tower["dev_ndcg@10"] == pytest.approx(per_query_all["q27"]["ndcg@10"])
    reg = report["registration"]
    assert reg["registered"] and reg["model"] == "tower" and reg["dev_ndcg@10"] == pytest.approx(tower["dev_ndcg@10"])
    assert evaluate.report_path(project, evaluate.EvaluateConfig()).name == "report_test.json"


def test_reciprocal_rank_fusion_by_hand():
    from annomine.model_specs import reciprocal_rank_fusion

    # a: 1/61 + 1/62; b: 1/62 + 1/61 (a tie, first seen first); c: 1/63; d: 1/61 alone
    assert reciprocal_rank_fusion([["a", "b", "c"], ["b", "a"], ["d"]], k=3) == ["a", "b", "d"]
    assert reciprocal_rank_fusion([["x"], []], k=5) == ["x"]
    assert reciprocal_rank_fusion([["a", "b"], ["b"]], k=2, rank_constant=0) == ["b", "a"]  # 1/1 + 1/2 against 1


def test_bm25_and_its_hybrids_search_one_index_per_catalog():
    from annomine.model_specs import Catalog, ModelSpec, retrieve

    catalog = Catalog(["p1", "p2", "p3"], ["red teapot", "blue teapot", "garden hose"])
    first, _ = retrieve(ModelSpec("bm25", "bm25", "bm25"), catalog, ["teapot", "hose"], 2, EncodeSettings())
    index = catalog.bm25
    again, _ = retrieve(ModelSpec("bm25", "bm25", "bm25"), catalog, ["teapot", "hose"], 2, EncodeSettings())
    assert catalog.bm25 is index and again == first and first[1] == ["p3"]


def test_a_dense_spec_suffixed_with_bm25_is_a_hybrid(project, tiny_model):
    zero_shot = resolve_specs("minilm+bm25", project.warehouse)[0]
    assert (zero_shot.label, zero_shot.kind, zero_shot.fusion, zero_shot.baseline) == ("minilm+bm25", "minilm", "rrf:bm25", True)
    named = resolve_specs(f"mine={tiny_model}+bm25", project.warehouse)[0]
    assert named.label == "mine" and named.fusion == "rrf:bm25" and not named.baseline and named.as_dict()["fusion"] == "rrf:bm25"
    assert resolve_specs(str(tiny_model), project.warehouse)[0].fusion is None
    with pytest.raises(ModelSpecError, match="only a dense model can be fused with bm25"):
        resolve_specs("bm25+bm25", project.warehouse)
    import shutil
    odd = shutil.copytree(tiny_model, tiny_model.parent / "odd+bm25")  # a folder whose name ends like a hybrid is a folder
    assert resolve_specs(str(odd), project.warehouse)[0].fusion is None


def test_variants_spec_includes_the_human_variants(project, tiny_model):
    registry = project.warehouse_path / "models"
    registry.mkdir(parents=True, exist_ok=True)
    for name in ("best", "curriculum", "human", "human_plus_curriculum"):
        (registry / f"{name}.json").write_text(json.dumps({"path": str(tiny_model), "variant": name, "model_uri": None}))
    specs = resolve_specs("variants", project.warehouse)
    assert [s.label for s in specs] == ["curriculum", "human", "human_plus_curriculum"]  # best.json is a pointer
    assert all(s.two_tower and not s.baseline for s in specs)


def test_spark_encoding_matches_driver_and_is_cached(spark, project, shop, tiny_model):
    catalog, _ = catalog_from_file(str(shop / "products.tsv"))
    spec = resolve_specs(f"t={tiny_model}", project.warehouse)[0]
    cache = project.warehouse_path / "cache"
    driver, info = catalog_embeddings(spec, catalog, EncodeSettings(cache=False), cache, spark=spark)
    assert info["how"] == "driver"
    in_spark, info = catalog_embeddings(spec, catalog, EncodeSettings(spark_threshold=0, spark_partitions=3), cache, spark=spark)
    assert info["how"] == "spark"
    np.testing.assert_allclose(in_spark, driver, atol=1e-5)
    again, info = catalog_embeddings(spec, catalog, EncodeSettings(spark_threshold=0), cache, spark=spark)
    assert info["how"] == "cache"
    np.testing.assert_array_equal(again, in_spark)


def test_table_mode_after_ingest(ctx, shop, tiny_model, tmp_path):
    from jobs import evaluate, ingest

    sources = ingest.crowdflower_sources(str(shop))
    ingest.run(ctx, ingest.IngestConfig(products=sources["products"], queries=sources["queries"], labels=sources["labels"]))
    cfg = evaluate.EvaluateConfig(models=[f"tower={tiny_model}"], split="all", mlflow=False, bootstrap_resamples=50,
                                  out=str(tmp_path / "table.json"))
    report = evaluate.run(ctx, cfg)
    assert report["inputs"]["products"].startswith("table ")
    assert report["segment_rule"] == "frequency (segments of the queries table)"
    # the embedded engine runs its UDFs in this process: a products table below the threshold is encoded on the driver
    assert report["models"][0]["retrieval"]["how"] == "driver"
    # The table and the file it came from are the same content: they share cached embeddings.
    assert catalog_from_table(ctx.tables)[0].content_key == catalog_from_file(str(shop / "products.tsv"))[0].content_key
    assert report["inputs"]["n_queries_evaluated"] == 4
    # Ingest's Spark merge and the evaluation's pandas merge agree on every pair.
    table = ctx.tables.read("human_labels").toPandas().set_index(["query_id", "product_id"]).sort_index()
    raw = pd.DataFrame(LABELS, columns=["query_id", "product_id", "grade", "variance"])
    merged = M.merge_labels(raw, 1, 4)[0].set_index(["query_id", "product_id"]).sort_index()
    assert table["grade"].to_dict() == merged["grade"].to_dict()
    np.testing.assert_allclose(table["variance"].to_numpy(), merged["variance"].to_numpy())


def test_table_mode_minilm_reads_the_ann_channel_s_vectors(ctx, shop, tmp_path):
    """The zero-shot baseline's catalog vectors come from `product_embeddings` (minilm@64, what the ANN channel writes)
    when every product has one from its current text: the ranking is the search over exactly those vectors. One
    stale product (its text changed since) and the catalog is encoded instead."""
    from annomine.encoders import TextEncoder
    from annomine.evaluation.index import retrieve_dense
    from jobs import evaluate, ingest

    sources = ingest.crowdflower_sources(str(shop))
    ingest.run(ctx, ingest.IngestConfig(products=sources["products"], queries=sources["queries"], labels=sources["labels"]))
    products = ctx.tables.read("products").select("product_id", "content_hash").toPandas().sort_values("product_id")
    rng = np.random.default_rng(0)
    fake = rng.normal(size=(len(products), 384)).astype(np.float32)
    fake /= np.linalg.norm(fake, axis=1, keepdims=True)   # not MiniLM's vectors: only a read of the table ranks by them
    rows = pd.DataFrame({"product_id": products["product_id"], "model": "minilm@64", "content_hash": products["content_hash"],
                         "embedding": [v.tolist() for v in fake]})
    ctx.tables.merge("product_embeddings", ctx.spark.createDataFrame(rows, ctx.tables.spec("product_embeddings").schema))
    cfg = evaluate.EvaluateConfig(models=["minilm"], split="all", mlflow=False, bootstrap_resamples=50,
                                  out=str(tmp_path / "stored.json"))
    report = evaluate.run(ctx, cfg)
    assert report["models"][0]["retrieval"]["how"] == "product_embeddings"
    labels = M.merge_labels(pd.DataFrame(LABELS, columns=["query_id", "product_id", "grade", "variance"]), 1, 4)[0]
    evaluated = sorted(labels["query_id"].unique())
    queries = ctx.tables.read("queries").toPandas()
    q_text = dict(zip(queries["query_id"], queries["query"]))
    ids, _ = retrieve_dense(fake, TextEncoder("minilm", max_length=16).encode([q_text[q] for q in evaluated]), 10)
    expected = {q: [products["product_id"].iat[int(i)] for i in row if i >= 0] for q, row in zip(evaluated, ids)}
    ndcg = M.per_query_metrics(expected, labels, 1, 4, k=10)["ndcg@10"].mean()
    assert report["models"][0]["metrics"]["all"]["ndcg@10"]["mean"] == pytest.approx(ndcg)

    stale = rows.iloc[:1].assign(content_hash="an older text")
    ctx.tables.merge("product_embeddings", ctx.spark.createDataFrame(stale, ctx.tables.spec("product_embeddings").schema))
    report = evaluate.run(ctx, cfg)
    assert report["models"][0]["retrieval"]["how"] == "driver"


def test_a_products_table_is_encoded_in_spark_on_a_cluster_and_above_the_threshold(spark, ctx, shop, tiny_model,
                                                                                   monkeypatch):
    """A products table goes through Spark where its UDFs run elsewhere (a cluster, a local JVM's Python workers) or
    when it is above the threshold; on the embedded engine, below the threshold, on the driver: the same vectors."""
    from annomine.evaluation import catalog as catalog_module
    from jobs import ingest

    sources = ingest.crowdflower_sources(str(shop))
    ingest.run(ctx, ingest.IngestConfig(products=sources["products"], queries=sources["queries"], labels=sources["labels"]))
    table, _ = catalog_from_table(ctx.tables)
    spec = resolve_specs(f"t={tiny_model}", ctx.project.warehouse)[0]
    assert catalog_module.is_embedded()
    driver, info = catalog_embeddings(spec, table, EncodeSettings(cache=False), None, spark=spark)
    assert info["how"] == "driver"
    above, info = catalog_embeddings(spec, table, EncodeSettings(cache=False, spark_threshold=len(table) - 1), None,
                                     spark=spark)
    assert info["how"] == "spark"
    monkeypatch.setattr(catalog_module, "is_embedded", lambda: False)  # the same session, as a cluster's
    cluster, info = catalog_embeddings(spec, table, EncodeSettings(cache=False), None, spark=spark)
    assert info["how"] == "spark"
    np.testing.assert_allclose(above, driver, atol=1e-5)
    np.testing.assert_allclose(cluster, driver, atol=1e-5)


def test_file_errors_name_the_file_and_column(tmp_path):
    bad = write_tsv(tmp_path / "products.tsv", ["id", "title"], [["p1", "x"]])
    with pytest.raises(InputError, match=r"products.tsv: missing required column\(s\) \['product_id'\]"):
        catalog_from_file(str(bad))
    with pytest.raises(InputError, match="input file not found"):
        catalog_from_file(str(tmp_path / "nope.tsv"))


def test_the_report_carries_the_judge_s_ranking_check(project, tmp_path):
    """`judge train` writes the check into the judge's metrics.json; the report quotes the current judge's."""
    from annomine.evaluation.report import markdown
    from annomine.judges.store import judges_root, set_current
    from jobs import evaluate

    estimate = lambda mean: {"mean": mean, "ci_low": mean - 0.02, "ci_high": mean + 0.02, "n": 19}
    folder = judges_root(project.warehouse) / "ce-test"
    folder.mkdir(parents=True)
    ranking = {"n_queries": 19, "baseline": "minilm", "judge_ndcg@10": estimate(0.89), "baseline_ndcg@10": estimate(0.87),
               "diff": estimate(0.02), "ratio": 0.89 / 0.87, "judge_wins": 8, "baseline_wins": 5}
    (folder / "metrics.json").write_text(json.dumps({"version": "ce-test", "dev_tier1": {"ranking": ranking}}))
    assert evaluate.teacher_check(project.warehouse) is None  # not the current judge yet
    set_current(project.warehouse, "ce-test")
    teacher = evaluate.teacher_check(project.warehouse)
    assert teacher["judge_version"] == "ce-test" and set(teacher) == {"judge_version", "dev"}
    assert teacher["dev"]["diff"]["mean"] == pytest.approx(0.02) and teacher["dev"]["baseline"] == "minilm"
    # fold 1 swaps the halves: the judge (fold 0) measured fold 1's test half under the name dev
    swapped = evaluate.teacher_check(project.warehouse, fold=1)
    assert set(swapped) == {"judge_version", "test"} and swapped["test"] == teacher["dev"]
    report = {"inputs": {"n_queries_evaluated": 2}, "split": "test", "bootstrap": {"confidence": 0.95, "resamples": 10},
              "grade_scale": {"min": 1}, "index": "flat", "models": [], "comparisons": [], "segment_rule": "length",
              "segment_counts": {}, "teacher": teacher}
    text = markdown(report)
    assert "## The judge as a teacher" in text
    assert "- dev (19 queries): judge 0.8900 [0.8700, 0.9100], minilm 0.8700 [0.8500, 0.8900]: 1.023x, paired +0.0200" in text
