"""Curriculum stage: graded labels decide, errors are counted, dev queries excluded, shards + manifest."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from annomine import curriculum as cur
from annomine.splits import split_of

CLASS_GRADES = {  # class -> grades of its two candidates (the judge disagrees with set logic sometimes)
    "easy_positive": (4, 3),
    "hard_positive": (4, 2),
    "hard_negative": (1, 4),
    "token_similar_negative": (1, 2),
    "random_negative": (None, None),  # not annotated: set-logic fallback
}
NOW = dt.datetime(2026, 1, 1)
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
                    ann.append((qid, pid, "v1", grade, 0.9, "llm", "{}", 1.0, 1, 1, None, NOW, 1))
                labels.append((qid, pid, grade or 1, 0.0, "test", NOW))
    # one annotation error, and an older judge version that the newest one supersedes
    ann.append(("q000", "p000_ep1", "v2", None, None, "llm", "{}", 1.0, 1, 1, "timeout", NOW + dt.timedelta(days=1), 1))
    ann.append(("q001", "p001_hp0", "v0", 1, 0.5, "llm", "{}", 1.0, 1, 1, None, NOW - dt.timedelta(days=1), 1))

    def write(name, rows):
        tables.overwrite(name, spark.createDataFrame(rows, tables.spec(name).schema))

    write("products", products)
    write("queries", queries)
    write("mined_candidates", mined)
    write("annotations", ann)
    write("human_labels", labels)
    return [q[0] for q in queries]


def _labelled(ctx, rules, dev):
    ann = cur.latest_annotations(ctx.tables.read("annotations"))
    return cur.label_candidates(ctx.tables.read("mined_candidates"), ann, ctx.tables.read("products"), dev, rules)


def test_graded_labels_decide_and_errors_are_counted(ctx):
    qids = build_world(ctx, n_queries=6)
    lab = _labelled(ctx, cur.LabelRules(), ["q005"]).toPandas().set_index(["query_id", "product_id"])
    # a hard negative graded 4 is a positive; a hard positive graded 2 is a negative
    assert lab.loc[("q002", "p002_hn1"), "label"] == 1 and lab.loc[("q002", "p002_hn1"), "candidate_class"] == "hard_negative"
    assert lab.loc[("q002", "p002_hn1"), "status"] == "ok"
    assert lab.loc[("q002", "p002_hp1"), "label"] == 0 and lab.loc[("q002", "p002_hp1"), "grade"] == 2
    # newest annotation wins: q000's easy1 is an error now, q001's hard0 keeps its v1 grade (4)
    assert lab.loc[("q000", "p000_ep1"), "status"] == cur.ERROR and pd.isna(lab.loc[("q000", "p000_ep1"), "label"])
    assert lab.loc[("q001", "p001_hp0"), "grade"] == 4
    # random negatives: unannotated, set-logic fallback -> negative
    assert lab.loc[("q003", "p003_rn0"), "label"] == 0 and pd.isna(lab.loc[("q003", "p003_rn0"), "grade"])
    # dev query excluded
    assert (lab.loc["q005", "status"] == cur.DEV).all()
    counts = lab["status"].value_counts().to_dict()
    assert counts == {"ok": 49, "dev_query": 10, "annotation_error": 1}
    # without fallback, random negatives are unannotated and dropped
    strict = _labelled(ctx, cur.LabelRules(set_logic_fallback=[]), []).toPandas()
    assert (strict[strict["candidate_class"] == "random_negative"]["status"] == cur.UNANNOTATED).all()
    # no_llm: set logic alone, the hard negative graded 4 stays a negative
    nollm = cur.label_candidates(ctx.tables.read("mined_candidates"), None, ctx.tables.read("products"), [],
                                 cur.LabelRules(use_annotations=False)).toPandas().set_index(["query_id", "product_id"])
    assert nollm.loc[("q002", "p002_hn1"), "label"] == 0
    assert len(qids) == 6


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
    cfg = CurriculumConfig(variants=["curriculum", "no_llm"], num_files=2, row_group_size=4, dev_pool_size=5)
    summary = run(ctx, cfg)
    out = capsys.readouterr().out
    assert "annotation_error=1" in out and "stage 1 easy (bce)" in out
    dev_ids = {q for q in qids if split_of(q) == "dev"}
    assert dev_ids, "the fixture should have dev queries"
    root = ctx.project.warehouse_path / "shards"
    manifest = json.loads((root / "curriculum" / "manifest.json").read_text())
    assert [s["loss"] for s in manifest["stages"]] == ["bce", "mnr", "triplet"]
    assert manifest["sources"]["annotations"] == ctx.tables.version("annotations")
    table = ctx.tables.read("train_set_curriculum").toPandas()
    assert not set(table["query_id"]) & dev_ids
    for entry in manifest["stages"]:
        files = sorted((root / "curriculum" / entry["folder"]).glob("part-*.parquet"))
        assert len(files) == 2 and entry["rows"] == (table["stage"] == entry["stage"]).sum()
        assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == entry["rows"]
        assert all(pq.ParquetFile(f).metadata.row_group(0).num_rows == min(4, pq.ParquetFile(f).metadata.num_rows) for f in files)
        assert sum(c["rows"] for c in entry["composition"] if c["side"] == "item") == entry["rows"]
    dev = pd.read_parquet(root / "dev_eval.parquet")
    assert set(dev["query_id"]) == dev_ids
    pool = pd.read_parquet(root / "dev_pool.parquet")
    assert set(dev["product_id"]) <= set(pool["product_id"])
    assert summary["variants"]["no_llm"]["candidate_status"].get("annotation_error") is None
    # re-run is idempotent
    run(ctx, cfg)
    assert len(ctx.tables.read("train_set_curriculum").toPandas()) == len(table)


def test_config_refuses_bad_stage():
    with pytest.raises(ValueError, match="loss must be one of"):
        cur.StageDef("x", "softmax", ["easy_positive"]).validate()
    with pytest.raises(ValueError, match="unknown candidate class"):
        cur.StageDef("x", "mnr", ["easy"]).validate()
