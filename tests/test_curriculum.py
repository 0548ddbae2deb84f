"""Curriculum stage: graded labels decide, errors are counted, dev and test queries excluded, shards + manifest,
the human-label variants."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from annomine import curriculum as cur
from annomine.graded_content import content_hash_of
from annomine.splits import split_of

CLASS_GRADES = {  # class -> grades of its two candidates (the judge disagrees with set logic sometimes)
    "easy_positive": (4, 3),
    "hard_positive": (4, 2),
    "hard_negative": (1, 4),
    "token_similar_negative": (1, 2),
    "random_negative": (None, None),  # not annotated: set-logic fallback
}
NOW = dt.datetime(2026, 1, 1)
# Variants beyond the shipped two, as data: the mechanisms the curriculum job offers (a set-logic source, a human
# stage before or inside the mined ones).
RESEARCH_VARIANTS = {"curriculum": ["easy", "hard", "token_similar"], "human": ["human"],
                     "no_llm": ["easy_set_logic", "hard_set_logic", "token_similar_set_logic"],
                     "human_plus_curriculum": ["human", "easy", "hard", "token_similar"],
                     "curriculum_with_human": ["easy", "hard+human", "token_similar"]}


# Every mechanism at once: a single mixed stage, a listwise last stage, the human stage after the mined ones.
EVERY_VARIANT = {**RESEARCH_VARIANTS, "mixed": ["mixed"], "curriculum_roar": ["easy", "hard", "roar"],
                 "curriculum_then_human": ["easy", "hard", "token_similar", "human"]}


def with_set_logic_stages(stages: list) -> list:
    """`stages` plus a set-logic copy (`<name>_set_logic`) of each mined stage."""
    return [*stages, *(replace(s, name=f"{s.name}_set_logic", source="set_logic") for s in stages if s.source == "mined")]


def every_stage(stages: list) -> list:
    """`stages` with their set-logic copies, a mixed MNR stage and a ROAR stage over every class."""
    return [*with_set_logic_stages(stages), cur.StageDef("mixed", "mnr", list(cur.CLASSES), list(cur.CLASSES), max_examples=9000,
                                                         max_per_query=60),
            cur.StageDef("roar", "roar", list(cur.CLASSES), list(cur.CLASSES), max_examples=2000, max_per_query=20)]
ABBR = {"easy_positive": "ep", "hard_positive": "hp", "hard_negative": "hn", "token_similar_negative": "ts",
        "random_negative": "rn"}


def build_world(ctx, n_queries: int = 12):
    """Small hand-built products/queries/human_labels/mined_candidates/annotations tables."""
    spark, tables = ctx.spark, ctx.tables
    colours = ["red", "blue", "green", "black", "white", "pink", "grey", "brown", "gold", "silver", "navy", "beige",
               "olive", "teal", "coral", "ivory"]
    kinds = ["shoe", "lamp", "mug", "chair", "sock"]
    products, queries, mined, ann, labels = [], [], [], [], []
    for qi in range(n_queries):
        qid = f"q{qi:03d}"
        colour, kind = colours[qi % len(colours)], kinds[qi % len(kinds)]
        query = f"{colour} {kind}"
        queries.append((qid, query, 10, "head", "labelled", "test", NOW))
        for cls, grades in CLASS_GRADES.items():
            for j, grade in enumerate(grades):
                pid = f"p{qi:03d}_{ABBR[cls]}{j}"
                text = f"{colour} {kind} {cls} item {j}" if "positive" in cls else f"{kinds[(qi + 1) % 5]} {cls} {j}"
                products.append((pid, text, "", "", "", "", text, "h", "test", NOW))
                level = {"easy_positive": 1, "hard_positive": 2, "hard_negative": 3, "token_similar_negative": 4,
                         "random_negative": 5}[cls]
                polarity = "positive" if "positive" in cls else "negative"
                mined.append((qid, query, pid, None, None, None, None, None, None, 1, 1, 1, 0, 0.5, cls, level,
                              polarity, "head", NOW))
                if grade is not None:
                    ann.append((qid, pid, "v1", grade, 0.9, "llm", "{}", 1.0, 1, 1, None, NOW, 1, None,
                                content_hash_of(query, text)))
                labels.append((qid, pid, grade or 1, 0.0, "test", NOW))
    # one annotation error, and an older judge version that the newest one supersedes
    graded_for = {(a[0], a[1]): a[-1] for a in ann}
    ann.append(("q000", "p000_ep1", "v2", None, None, "llm", "{}", 1.0, 1, 1, "timeout", NOW + dt.timedelta(days=1), 1, None,
                graded_for[("q000", "p000_ep1")]))
    ann.append(("q001", "p001_hp0", "v0", 1, 0.5, "llm", "{}", 1.0, 1, 1, None, NOW - dt.timedelta(days=1), 1, None,
                graded_for[("q001", "p001_hp0")]))

    def write(name, rows):
        tables.overwrite(name, spark.createDataFrame(rows, tables.spec(name).schema))

    write("products", products)
    write("queries", queries)
    write("mined_candidates", mined)
    write("annotations", ann)
    write("human_labels", labels)
    return [q[0] for q in queries]


def _labelled(ctx, rules, dev, test=()):
    ann = cur.latest_annotations(ctx.tables.read("annotations"))
    return cur.label_candidates(ctx.tables.read("mined_candidates"), ann, ctx.tables.read("products"), dev, rules, list(test))


def test_graded_labels_decide_and_errors_are_counted(ctx):
    qids = build_world(ctx, n_queries=6)
    lab = _labelled(ctx, cur.LabelRules(), ["q005"], ["q004"]).toPandas().set_index(["query_id", "product_id"])
    # a hard negative graded 4 is a positive; a hard positive graded 2 is a negative
    assert lab.loc[("q002", "p002_hn1"), "label"] == 1 and lab.loc[("q002", "p002_hn1"), "candidate_class"] == "hard_negative"
    assert lab.loc[("q002", "p002_hn1"), "status"] == "ok"
    assert lab.loc[("q002", "p002_hp1"), "label"] == 0 and lab.loc[("q002", "p002_hp1"), "grade"] == 2
    # newest annotation wins: q000's easy1 is an error now, q001's hard0 keeps its v1 grade (4)
    assert lab.loc[("q000", "p000_ep1"), "status"] == cur.ERROR and pd.isna(lab.loc[("q000", "p000_ep1"), "label"])
    assert lab.loc[("q001", "p001_hp0"), "grade"] == 4
    # random negatives: unannotated, set-logic fallback -> negative
    assert lab.loc[("q003", "p003_rn0"), "label"] == 0 and pd.isna(lab.loc[("q003", "p003_rn0"), "grade"])
    # dev and test queries excluded
    assert (lab.loc["q005", "status"] == cur.DEV).all() and (lab.loc["q004", "status"] == cur.TEST).all()
    assert lab.loc[["q004", "q005"], "label"].isna().all()
    counts = lab["status"].value_counts().to_dict()
    assert counts == {"ok": 39, "dev_query": 10, "test_query": 10, "annotation_error": 1}
    # without fallback, random negatives are unannotated and dropped
    strict = _labelled(ctx, cur.LabelRules(set_logic_fallback=[]), []).toPandas()
    assert (strict[strict["candidate_class"] == "random_negative"]["status"] == cur.UNANNOTATED).all()
    # no_llm: set logic alone, the hard negative graded 4 stays a negative
    nollm = cur.label_candidates(ctx.tables.read("mined_candidates"), None, ctx.tables.read("products"), [],
                                 cur.LabelRules(use_annotations=False)).toPandas().set_index(["query_id", "product_id"])
    assert nollm.loc[("q002", "p002_hn1"), "label"] == 0
    assert len(qids) == 6


def test_a_grade_given_for_other_content_is_not_used(ctx):
    build_world(ctx, n_queries=4)
    from pyspark.sql import functions as F

    def edit(table, where, column, value):
        df = ctx.tables.read(table)
        ctx.tables.overwrite(table, df.withColumn(column, F.when(where, F.lit(value)).otherwise(F.col(column))))

    edit("products", F.col("product_id") == "p002_hn1", "text", "garden hose reel")  # graded 4; now unrelated
    edit("mined_candidates", F.col("query_id") == "q003", "query", "navy sock")  # an edited query: all its grades stale
    lab = _labelled(ctx, cur.LabelRules(), []).toPandas().set_index(["query_id", "product_id"])
    assert lab.loc[("q002", "p002_hn1"), "status"] == cur.STALE and pd.isna(lab.loc[("q002", "p002_hn1"), "label"])
    assert lab.loc[("q002", "p002_hn0"), "status"] == "ok" and lab.loc[("q002", "p002_hn0"), "grade"] == 1
    q003 = lab.loc["q003"]
    assert (q003[q003["candidate_class"] != "random_negative"]["status"] == cur.STALE).all()
    assert (q003[q003["candidate_class"] == "random_negative"]["label"] == 0).all()  # set logic, as unannotated
    assert lab["status"].value_counts()[cur.STALE] == 1 + 8

    # a table written before content hashes were recorded: every grade is stale
    old = ctx.tables.read("annotations").drop("content_hash")
    lab = cur.label_candidates(ctx.tables.read("mined_candidates"), cur.latest_annotations(old),
                               ctx.tables.read("products"), [], cur.LabelRules()).toPandas()
    assert set(lab["status"]) == {cur.STALE, "ok"} and lab[lab["status"] == "ok"]["grade"].isna().all()


def test_stage_rows_formats(ctx):
    build_world(ctx, n_queries=6)
    lab = _labelled(ctx, cur.LabelRules(), [])
    bce = cur.stage_rows(lab, cur.StageDef("easy", "bce", ["easy_positive"], ["random_negative"]), 1).toPandas()
    assert set(bce["candidate_class"]) == {"easy_positive", "random_negative"}
    assert set(bce["label"]) == {0, 1} and bce["neg_product_id"].isna().all()
    # q000 easy1 errored: 11 easy positives + 12 random negatives
    assert len(bce) == 23
    trip = cur.stage_rows(lab, cur.StageDef("ts", "triplet", list(cur.CLASSES), ["token_similar_negative"]), 1).toPandas()
    assert (trip["label"] == 1).all() and trip["neg_product_id"].notna().all()
    assert set(trip["neg_class"]) == {"token_similar_negative"} and set(trip["neg_grade"]) <= {1, 2}
    assert (trip["grade"] >= 3).all()
    # pairs stay within the query
    assert all(n.startswith(f"p{q[1:]}") for q, n in zip(trip["query_id"], trip["neg_product_id"]))
    roar = cur.stage_rows(lab, cur.StageDef("roar", "roar", list(cur.CLASSES), list(cur.CLASSES)), 1, 5).toPandas()
    assert len(roar) == 6
    for grades in roar["group_grades"]:
        assert list(grades) == sorted(grades, reverse=True) and len(grades) <= 5 and grades[0] >= 3
    capped = cur.stage_rows(lab, cur.StageDef("easy", "bce", ["easy_positive"], ["random_negative"], max_examples=7), 1)
    assert capped.count() == 7


def test_group_items_is_pure_and_keeps_every_grade():
    pdf = pd.DataFrame({"query_id": "q", "query": "x", "product_id": [f"p{i}" for i in range(10)],
                        "item_text": "t", "label": [1] * 6 + [0] * 4, "grade": [4, 4, 4, 4, 4, 3, 2, 1, 1, 1],
                        "candidate_class": "easy_positive", "level": 1})
    out = cur.group_items(pdf, max_group_size=4, seed=1)
    assert len(out) == 1
    grades = out.iloc[0]["group_grades"]
    assert grades[0] == 4 and set(grades) == {4, 3, 2, 1} and len(grades) == 4


def test_curriculum_job_writes_tables_shards_and_manifest(ctx, tmp_path, capsys):
    from jobs.curriculum import CurriculumConfig, run

    qids = build_world(ctx, n_queries=16)
    cfg = CurriculumConfig(variants=RESEARCH_VARIANTS, num_files=2, row_group_size=4, dev_pool_size=5,
                           stages=with_set_logic_stages(CurriculumConfig().stages))
    variants = list(cfg.variants)
    for stage in cfg.stages:
        if stage.source != "human":
            stage.max_examples = 6  # caps that bind: which rows a stage keeps depends on its seed
    summary = run(ctx, cfg)
    out = capsys.readouterr().out
    assert "annotation_error=1" in out and "stage 1 easy (bce)" in out
    dev_ids = {q for q in qids if split_of(q) == "dev"}
    test_ids = {q for q in qids if split_of(q) == "test"}
    train_ids = set(qids) - dev_ids - test_ids
    assert dev_ids and test_ids, "the fixture should have dev and test queries"
    assert summary["splits"] == {"train": len(train_ids), "dev": len(dev_ids), "test": len(test_ids)}
    # another rotation (annomine.splits) holds out another block of the labelled queries
    from dataclasses import replace
    from types import SimpleNamespace

    from jobs.curriculum import labelled_splits
    rotated = labelled_splits(SimpleNamespace(tables=ctx.tables, project=replace(ctx.project, rotation=1)), cfg)
    assert set(rotated["dev"]) | set(rotated["test"]) == {q for q in qids if split_of(q, rotation=1) != "train"}
    assert not (set(rotated["dev"]) | set(rotated["test"])) & (dev_ids | test_ids)
    root = ctx.project.warehouse_path / "shards"
    manifest = json.loads((root / "curriculum" / "manifest.json").read_text())
    assert [s["loss"] for s in manifest["stages"]] == ["bce", "mnr", "triplet"]
    assert manifest["sources"]["annotations"] == ctx.tables.version("annotations")
    assert manifest["candidate_status"]["dev_query"] == 10 * len(dev_ids)
    assert manifest["candidate_status"]["test_query"] == 10 * len(test_ids)
    table = ctx.tables.read("train_set_curriculum").toPandas()
    # no training row, in any variant, for a dev or a test query
    for variant in variants:
        rows = ctx.tables.read(f"train_set_{variant}").toPandas()
        assert len(rows) and set(rows["query_id"]) <= train_ids, variant
        shard_rows = pd.concat([pd.read_parquet(f) for f in (root / variant).glob("run-*/stage*/part-*.parquet")])
        assert len(list((root / variant).glob("run-*/"))) == 1, "one published set per variant"
        assert set(shard_rows["query_id"]) <= train_ids, variant
    for entry in manifest["stages"]:
        files = sorted((root / "curriculum" / entry["folder"]).glob("part-*.parquet"))
        assert len(files) == 2 and entry["rows"] == (table["stage"] == entry["stage"]).sum()
        assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == entry["rows"]
        assert all(pq.ParquetFile(f).metadata.row_group(0).num_rows == min(4, pq.ParquetFile(f).metadata.num_rows) for f in files)
        assert sum(c["rows"] for c in entry["composition"] if c["side"] == "item") == entry["rows"]
    # the runner's selection pool: dev queries only (never test)
    dev = pd.read_parquet(root / "dev_eval.parquet")
    assert set(dev["query_id"]) == dev_ids and not set(dev["query_id"]) & test_ids
    pool = pd.read_parquet(root / "dev_pool.parquet")
    assert set(dev["product_id"]) <= set(pool["product_id"])
    assert summary["variants"]["no_llm"]["candidate_status"].get("annotation_error") is None
    # no_llm: the curriculum's stages labelled by set logic (the hard negative graded 4 stays a negative)
    nollm = ctx.tables.read("train_set_no_llm").toPandas()
    assert [s["name"] for s in summary["variants"]["no_llm"]["stages"]] == [
        "easy_set_logic", "hard_set_logic", "token_similar_set_logic"]
    assert nollm["grade"].isna().all() and not (table["grade"].isna().all())

    # human: one MNR stage over the train queries' human labels, grade 4 positive, a <= 2 negative of the same query
    human = json.loads((root / "human" / "manifest.json").read_text())
    assert [(s["name"], s["loss"]) for s in human["stages"]] == [("human", "mnr")]
    assert human["human_label_status"] == {"ok": 9 * len(train_ids), "ambiguous_grade": len(train_ids),
                                           "dev_query": 10 * len(dev_ids), "test_query": 10 * len(test_ids)}
    hrows = pd.concat([pd.read_parquet(f) for f in (root / "human").glob("run-*/stage1_human/part-*.parquet")])
    labels = ctx.tables.read("human_labels").toPandas()
    grade_of = {(q, p): g for q, p, g in zip(labels["query_id"], labels["product_id"], labels["grade"])}
    assert len(hrows) == 3 * len(train_ids)  # every grade-4 label of a train query (3 per query here)
    assert set(hrows["query_id"]) == train_ids and (hrows["candidate_class"] == cur.HUMAN_LABEL).all()
    assert (hrows["label"] == 1).all() and (hrows["grade"] == 4).all()
    assert all(grade_of[(q, p)] == 4 for q, p in zip(hrows["query_id"], hrows["product_id"]))
    assert hrows["neg_product_id"].notna().all() and (hrows["neg_grade"] <= 2).all()
    assert all(grade_of[(q, n)] == g for q, n, g in zip(hrows["query_id"], hrows["neg_product_id"], hrows["neg_grade"]))
    assert "[human] human labels: " in out and "[human] candidates:" not in out
    # human_plus_curriculum: the same human stage first, then the curriculum's stages
    both = json.loads((root / "human_plus_curriculum" / "manifest.json").read_text())
    assert [s["name"] for s in both["stages"]] == ["human", "easy", "hard", "token_similar"]
    assert [s["source"] for s in both["stages"]] == ["human", "mined", "mined", "mined"]
    assert both["stages"][0]["rows"] == len(hrows)
    assert [s["rows"] for s in both["stages"][1:]] == [s["rows"] for s in manifest["stages"]]
    both_rows = ctx.tables.read("train_set_human_plus_curriculum").toPandas()
    assert set(both_rows.loc[both_rows["stage"] == 1, "product_id"]) == set(hrows["product_id"])
    key = ["query_id", "product_id", "neg_product_id"]
    for k in (1, 2, 3):  # its curriculum stages are the curriculum variant's, row for row
        mine = both_rows[both_rows["stage"] == k + 1][key].sort_values(key).reset_index(drop=True)
        assert mine.equals(table[table["stage"] == k][key].sort_values(key).reset_index(drop=True))
    # curriculum_with_human: the curriculum's stages, its MNR stage holding its own rows and the human stage's
    blended = json.loads((root / "curriculum_with_human" / "manifest.json").read_text())
    assert [(s["name"], s["source"]) for s in blended["stages"]] == [
        ("easy", "mined"), ("hard_with_human", "mined+human"), ("token_similar", "mined")]
    assert blended["stages"][1]["source_rows"] == {"mined": manifest["stages"][1]["rows"], "human": len(hrows)}
    assert manifest["stages"][1]["source_rows"] == {"mined": manifest["stages"][1]["rows"], "human": 0}
    blend_rows = ctx.tables.read("train_set_curriculum_with_human").toPandas()
    for k in (1, 2, 3):
        mine = blend_rows[(blend_rows["stage"] == k) & (blend_rows["candidate_class"] != cur.HUMAN_LABEL)][key]
        assert mine.sort_values(key).reset_index(drop=True).equals(
            table[table["stage"] == k][key].sort_values(key).reset_index(drop=True))
    human_part = blend_rows[blend_rows["candidate_class"] == cur.HUMAN_LABEL]
    assert set(human_part["stage"]) == {2} and human_part[key].sort_values(key).reset_index(drop=True).equals(
        hrows[key].sort_values(key).reset_index(drop=True))
    # re-run is idempotent
    run(ctx, cfg)
    assert len(ctx.tables.read("train_set_curriculum").toPandas()) == len(table)
    # fold 1: the test queries select and the dev ones report; the training rows are the same, the shards its own
    ctx.project.fold = 1
    try:
        run(ctx, CurriculumConfig(variants={"curriculum": ["easy", "hard", "token_similar"]}, num_files=2,
                                  row_group_size=4, dev_pool_size=5, stages=cfg.stages))
    finally:
        ctx.project.fold = 0
    fold_root = ctx.project.warehouse_path / "folds" / "fold1" / "shards"
    assert set(pd.read_parquet(fold_root / "dev_eval.parquet")["query_id"]) == test_ids
    assert set(pd.read_parquet(root / "dev_eval.parquet")["query_id"]) == dev_ids  # fold 0's untouched
    fold_rows = pd.concat([pd.read_parquet(f) for f in (fold_root / "curriculum").glob("run-*/stage*/part-*.parquet")])
    fold0_rows = pd.concat([pd.read_parquet(f) for f in (root / "curriculum").glob("run-*/stage*/part-*.parquet")])
    assert sorted(fold_rows["query_id"] + fold_rows["product_id"]) == sorted(fold0_rows["query_id"] + fold0_rows["product_id"])


def test_config_refuses_bad_stage():
    with pytest.raises(ValueError, match="loss must be one of"):
        cur.StageDef("x", "softmax", ["easy_positive"]).validate()
    with pytest.raises(ValueError, match="unknown candidate class"):
        cur.StageDef("x", "mnr", ["easy"]).validate()
    with pytest.raises(ValueError, match="unknown candidate class"):  # a mined stage cannot read human labels
        cur.StageDef("x", "mnr", [cur.HUMAN_LABEL]).validate()
    with pytest.raises(ValueError, match="unknown candidate class"):
        cur.StageDef("x", "mnr", ["easy_positive"], source="human").validate()
    with pytest.raises(ValueError, match="source must be one of"):
        cur.StageDef("x", "mnr", ["easy_positive"], source="llm").validate()
    from jobs.curriculum import CurriculumConfig

    cfg = CurriculumConfig()
    assert cfg.variants == {"curriculum": ["easy", "hard", "token_similar"], "human": ["human"]}
    cfg.validate()
    defs = with_set_logic_stages(cfg.stages)
    assert [s.name for s in cur.resolve_variant("hc", ["human", "easy", "hard", "token_similar"], defs)] == [
        "human", "easy", "hard", "token_similar"]
    mixed = cur.resolve_variant("cwh", ["easy", "hard+human", "token_similar"], defs)
    human = next(d for d in defs if d.name == "human")
    assert [s.name for s in mixed] == ["easy", "hard_with_human", "token_similar"]  # the human rows join the MNR stage
    assert mixed[1].blend is human and mixed[1].reads("human") and mixed[1].reads("mined")
    assert not cfg.stages[1].reads("human") and cfg.stages[1].blend is None  # the definitions themselves are untouched
    with pytest.raises(ValueError, match="same loss"):
        cur.resolve_variant("v", ["easy+human"], defs)
    with pytest.raises(ValueError, match="same loss"):
        replace(cfg.stages[0], blend=human).validate()
    with pytest.raises(ValueError, match=r"variants.v: unknown stage 'nope'"):
        cur.resolve_variant("v", ["easy", "nope"], defs)
    with pytest.raises(ValueError, match=r"variants.v: an empty list of stages"):
        cur.resolve_variant("v", [], defs)
    with pytest.raises(ValueError, match=r"mixes stages of sources \['mined', 'set_logic'\]"):
        cur.resolve_variant("v", ["easy", "hard_set_logic"], defs)
    for bad, message in [(["curriculum"], "variants: a mapping of variant name -> its stage names"),
                         ({"v": ["nope"]}, "unknown stage 'nope'"), ({"best": ["easy"]}, "not 'best'"),
                         ({"a-b": ["easy"]}, "letters, digits")]:
        with pytest.raises(ValueError, match=message):
            replace(cfg, variants=bad).validate()
    with pytest.raises(ValueError, match="names must be unique"):
        replace(cfg, stages=[*cfg.stages, cfg.stages[0]]).validate()
    cfg.stages[0].source = "human"
    with pytest.raises(ValueError):
        cfg.validate()
