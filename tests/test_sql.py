"""The SQL files in sql/ against the embedded engine: demo tables from `ingest` on a tiny generated
shop, plus small hand-built mined_candidates / annotations / retrieval_logs / training-set rows whose
expected results are worked out by hand below."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from annomine.config import ProjectConfig
from annomine.runtime import JobContext
from annomine.schemas import TABLES
from annomine.sql_runner import (SqlFileError, default_sql_dir, load_file, referenced_tables, run_all,
                                 split_statements, sql_files)
from annomine.tables import TableStore
from tests.test_bundle import NOTEBOOKS, run_notebook

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 5, 10, 0, 0)
T1 = datetime(2026, 1, 5, 11, 0, 0)
T2 = datetime(2026, 1, 6, 9, 0, 0)


def _rows(name, dicts):
    cols = TABLES[name].columns
    return [tuple(d.get(c) for c in cols) for d in dicts]


def _put(ctx, name, dicts):
    ctx.tables.overwrite(name, ctx.spark.createDataFrame(_rows(name, dicts), TABLES[name].schema))


def _cand(q, p, lex, bm25, ann, cls, level, segment):
    ranks = [r for r in (lex, bm25, ann) if r is not None]
    return dict(query_id=q, query=f"query {q}", product_id=p, rank_lexical=lex, rank_bm25=bm25, rank_ann=ann,
                n_channels=len(ranks), best_rank=min(ranks) if ranks else None, worst_rank=max(ranks) if ranks else None,
                rank_spread=(max(ranks) - min(ranks)) if ranks else None, candidate_class=cls, level=level,
                polarity="positive" if level <= 2 else "negative", segment=segment, mined_at=T0)


def _ann(q, p, version, grade, tier, outputs, error=None, at=T1):
    return dict(query_id=q, product_id=p, judge_version=version, grade=grade, confidence=0.9 if grade else None,
                deciding_tier=tier, tier_outputs=json.dumps(outputs), latency_ms=12.0, prompt_tokens=100,
                completion_tokens=3, error=error, annotated_at=at)


def _graded_for(ctx, anns, stale):
    """Annotations with the content hash of the pair's query and product text (a made-up one for the `stale` pairs:
    graded for an earlier text)."""
    from annomine.graded_content import content_hash_of

    texts = {r.product_id: r.text for r in ctx.tables.read("products").select("product_id", "text").collect()}
    return [dict(a, content_hash="graded-for-an-earlier-text" if (a["query_id"], a["product_id"]) in stale
                 else content_hash_of(f"query {a['query_id']}", texts[a["product_id"]])) for a in anns]


@pytest.fixture(scope="module")
def demo(spark, tmp_path_factory):
    """Ingested demo shop + hand-built rows, in a schema of its own on the shared session."""
    tmp = tmp_path_factory.mktemp("sqldemo")
    schema = f"sql_{uuid.uuid4().hex[:8]}"
    conf = tmp / "conf.yaml"
    conf.write_text(
        f"project: {{name: sqltest, warehouse: '{tmp / 'wh'}', schema: {schema}}}\n"
        "ingest:\n"
        f"  demo_shop: {{folder: '{tmp / 'shop'}', n_products: 60, n_queries: 12, n_labelled: 3, seed: 7}}\n"
        f"  products: {{path: '{tmp / 'shop' / 'products.tsv'}'}}\n"
        f"  queries: {{path: '{tmp / 'shop' / 'queries.tsv'}'}}\n"
        f"  labels: {{path: '{tmp / 'shop' / 'labels.tsv'}'}}\n"
        "  queries_origin: log\n")
    # Through the Databricks stage notebook (its widgets, `%run ./_common`), which calls jobs/ingest.py's main.
    run_notebook(NOTEBOOKS / "run_stage.py", {"stage": "ingest", "catalog": "", "schema": "", "conf": str(conf), "input": ""},
                 spark)
    project = ProjectConfig(name="sqltest", warehouse=str(tmp / "wh"), schema=schema)
    ctx = JobContext(project, spark, TableStore(spark, project))
    pids = sorted(r.product_id for r in ctx.tables.read("products").select("product_id").collect())[:6]
    P = dict(zip(["P1", "P2", "P3", "P4", "P5", "P6"], pids))
    _put(ctx, "mined_candidates", [
        _cand("qa", P["P1"], 1, 1, 1, "easy_positive", 1, "head"),
        _cand("qa", P["P2"], 2, 3, None, "hard_positive", 2, "head"),
        _cand("qa", P["P3"], None, None, 5, "hard_negative", 3, "head"),
        _cand("qa", P["P4"], None, None, None, "random_negative", 5, "head"),
        _cand("qb", P["P1"], 1, 2, 3, "easy_positive", 1, "tail"),
        _cand("qb", P["P5"], None, None, None, "token_similar_negative", 4, "tail"),
        _cand("qb", P["P6"], 60, None, None, "hard_negative", 3, "tail"),
        _cand("qc", P["P2"], 4, 2, None, "hard_positive", 2, None),
    ])
    _put(ctx, "annotations", _graded_for(ctx, [
        _ann("qa", P["P1"], "j1", 4, "tier1", {"tier1": {"grade": 4, "confidence": 0.95}}),
        _ann("qa", P["P2"], "j1", 3, "tier2", {"tier1": {"grade": 2, "confidence": 0.5}, "tier2": {"grade": 3, "confidence": 0.9}}),
        _ann("qa", P["P3"], "j1", 1, "tier3", {"tier1": {"grade": 3, "confidence": 0.4}, "tier2": {"grade": 2, "confidence": 0.6},
                                               "tier3": {"grade": 1, "confidence": 0.9}}),
        # failed under j1, re-graded by j2 later: the latest (graded) wins
        _ann("qb", P["P1"], "j1", None, "tier2", {"tier1": {"grade": 4, "confidence": 0.6}, "tier2": {"grade": None, "error": "timeout"}},
             error="tier2: timeout after 4 attempts"),
        _ann("qb", P["P1"], "j2", 4, "tier1", {"tier1": {"grade": 4, "confidence": 0.97}}, at=T2),
        _ann("qb", P["P5"], "j1", None, "tier2", {"tier1": {"grade": 2, "confidence": 0.4}, "tier2": {"grade": None, "error": "unparseable"}},
             error="tier2: unparseable answer 'maybe'"),
        _ann("qb", P["P6"], "j1", 2, "tier1", {"tier1": {"grade": 2, "confidence": 0.9}}),
        # graded for a text qc or P2 no longer has: stale, its grade counted nowhere
        _ann("qc", P["P2"], "j1", 2, "tier2", {"tier1": {"grade": 2, "confidence": 0.55}, "tier2": {"grade": 2, "confidence": 0.8}}),
    ], stale={("qc", P["P2"])}))
    ctx.tables.merge("human_labels", ctx.spark.createDataFrame(_rows("human_labels", [
        dict(query_id="qa", product_id=P["P1"], grade=4, variance=0.0, source="hand", ingested_at=T0),
        dict(query_id="qa", product_id=P["P3"], grade=2, variance=0.0, source="hand", ingested_at=T0),
        dict(query_id="qb", product_id=P["P6"], grade=2, variance=0.0, source="hand", ingested_at=T0),
    ]), TABLES["human_labels"].schema))

    def log(run, channel, q, items, at):
        return [dict(run_id=run, query_id=q, query=f"query {q}", channel=channel, product_id=P[p], rank=i + 1,
                     score=1.0 / (i + 1), logged_at=at, source="test") for i, p in enumerate(items)]
    _put(ctx, "retrieval_logs",
         log("r1", "lexical", "qa", ["P4", "P5"], T0)                       # an older lexical run: ignored
         + log("r2", "lexical", "qa", ["P1", "P2", "P6"], T1) + log("r2", "lexical", "qb", ["P1"], T1)
         + log("r3", "bm25", "qa", ["P1", "P2"], T1) + log("r3", "bm25", "qb", ["P1", "P5"], T1)
         + log("r4", "ann", "qa", ["P1", "P3"], T1))

    def row(stage, name, loss, q, p, cls, neg=None):
        return dict(stage=stage, stage_name=name, loss=loss, query_id=q, query=f"query {q}", product_id=P[p],
                    item_text="x", label=1 if cls.endswith("positive") else 0, grade=None, candidate_class=cls,
                    level=None, neg_product_id=P[neg] if neg else None)
    _put(ctx, "train_set_curriculum", [
        row(1, "easy", "bce", "qa", "P1", "easy_positive"), row(1, "easy", "bce", "qa", "P4", "random_negative"),
        row(1, "easy", "bce", "qb", "P1", "easy_positive"),
        row(2, "hard", "mnr", "qa", "P2", "hard_positive", neg="P3"), row(2, "hard", "mnr", "qc", "P2", "hard_positive"),
    ])
    _put(ctx, "train_set_no_llm", [row(1, "easy", "bce", "qa", "P1", "easy_positive")])
    ctx.tables.register_all()
    results = run_all(ctx)
    return ctx, P, {Path(r.file).stem: r for r in results if Path(r.file).name != "00_views.sql"}, results


def _collect(results, name):
    r = results[name]
    assert r.skipped is None, r.skipped
    return [tuple(float(v) if isinstance(v, Decimal) else v for v in x) for x in r.dataframe.collect()]


def test_every_sql_file_parses_and_has_a_description():
    files = sql_files()
    assert files[0].path.name == "00_views.sql"
    for f in files:
        assert f.description, f"{f.path}: starts with no comment saying what it answers"
        assert all("${namespace}." in s for s in f.statements), f"{f.path}: a statement names no ${{namespace}} table"


def test_views_and_queries_give_the_hand_computed_results(demo):
    ctx, P, results, allr = demo
    tested = {"difficulty_mix_by_segment", "grade_distribution_by_channels", "tier_disagreement", "tier_disagreement_pairs",
              "failed_annotations", "training_set_composition", "judge_vs_human", "channel_overlap", "quarantine_summary"}
    assert set(results) == tested, "a SQL file was added without a test of its results (or one was removed)"
    assert [r.skipped for r in allr if r.file.endswith("00_views.sql")] == [None] * 5

    assert _collect(results, "difficulty_mix_by_segment") == [
        ("head", 1, "easy_positive", 1, 1, 25), ("head", 2, "hard_positive", 1, 1, 25),
        ("head", 3, "hard_negative", 1, 1, 25), ("head", 5, "random_negative", 1, 1, 25),
        ("tail", 1, "easy_positive", 1, 1, pytest.approx(33.3)), ("tail", 3, "hard_negative", 1, 1, pytest.approx(33.3)),
        ("tail", 4, "token_similar_negative", 1, 1, pytest.approx(33.3)), ("unsegmented", 2, "hard_positive", 1, 1, 100)]
    # qb/P1 failed under j1 and was re-graded 4 by j2: it counts once, graded. qb/P5 (failed), qa/P4 (pending)
    # and qc/P2 (stale: graded for an earlier text) are not graded.
    assert _collect(results, "grade_distribution_by_channels") == [
        ("ann", 1, 1, 100, 1.0), ("lexical", 2, 1, 100, 2.0), ("lexical+bm25", 3, 1, 100, 3.0),
        ("lexical+bm25+ann", 4, 2, 100, 4.0)]
    assert _collect(results, "tier_disagreement") == [
        ("tier1", "tier2", 3, 1, pytest.approx(33.3), 100, pytest.approx(0.667)),
        ("tier1", "tier3", 1, 0, 0, 0, 2.0), ("tier2", "tier3", 1, 0, 0, 100, 1.0)]
    pairs = _collect(results, "tier_disagreement_pairs")
    assert [(r[0], r[2], r[7], json.loads(r[8])) for r in pairs] == [
        ("qa", P["P3"], 2, {"tier1": 3, "tier2": 2, "tier3": 1}), ("qa", P["P2"], 1, {"tier1": 2, "tier2": 3})]
    title = ctx.tables.read("products").where(f"product_id = '{P['P5']}'").collect()[0].title
    assert _collect(results, "failed_annotations") == [
        ("qb", "query qb", P["P5"], title, "token_similar_negative", 4, "j1", "tier2", "tier2: unparseable answer 'maybe'")]
    # train_set_mixed and train_set_curriculum_roar do not exist: the view unions the other two.
    assert _collect(results, "training_set_composition") == [
        ("curriculum", 1, "easy", "bce", "easy_positive", 2, 2, 0, pytest.approx(66.7)),
        ("curriculum", 1, "easy", "bce", "random_negative", 1, 1, 0, pytest.approx(33.3)),
        ("curriculum", 2, "hard", "mnr", "hard_positive", 2, 2, 1, 100),
        ("no_llm", 1, "easy", "bce", "easy_positive", 1, 1, 0, 100)]
    assert _collect(results, "judge_vs_human") == [("tier1", 2, 100, 100, 0.0), ("tier3", 1, 0, 100, 1.0)]
    # The older lexical run r1 is ignored: only each channel's latest run counts.
    assert _collect(results, "channel_overlap") == [
        ("ann", "bm25", 1, pytest.approx(0.333)), ("ann", "lexical", 1, 0.25), ("bm25", "lexical", 2, pytest.approx(0.583))]
    # The demo shop's deliberately bad rows, as ingest reported them.
    quarantine = [(r[0], r[2], r[3]) for r in _collect(results, "quarantine_summary")]
    assert quarantine == [("products", "duplicate product_id with different content (2 versions)", 2),
                          ("products", "empty title", 1), ("products", "missing product_id", 1),
                          ("products", "title: bad encoding: character U+FFFD", 1)]


def test_statements_needing_missing_tables_are_skipped_naming_the_writer(spark, tmp_path):
    from jobs.ingest import IngestConfig, run
    from annomine.sources import SourceConfig
    from tests.conftest import write_tsv

    project = ProjectConfig(name="t", warehouse=str(tmp_path / "wh"), schema=f"sqlmiss_{uuid.uuid4().hex[:8]}")
    ctx = JobContext(project, spark, TableStore(spark, project))
    products = write_tsv(tmp_path / "p.tsv", ["product_id", "title"], [["a", "Lamp"], ["", "no id"]])
    run(ctx, IngestConfig(products=SourceConfig(str(products))))
    results = {Path(r.file).stem: r for r in run_all(ctx, ["quarantine_summary", "failed_annotations"])}
    assert results["failed_annotations"].skipped == (
        f"needs view v_graded_candidates, skipped because it needs table {project.schema}.mined_candidates, "
        "which does not exist yet (written by: mine)")
    views = [r for r in run_all(ctx, ["quarantine_summary"]) if r.file.endswith("00_views.sql")]
    assert views[0].skipped == (f"needs table {project.schema}.annotations, which does not exist yet (written by: annotate)")
    assert all(r.skipped for r in views)
    assert [tuple(r)[2:4] for r in results["quarantine_summary"].dataframe.collect()] == [("missing product_id", 1)]
    with pytest.raises(KeyError, match="no SQL file"):
        run_all(ctx, ["no_such_query"])


def test_split_statements_placeholders_and_references(tmp_path):
    sql = "-- a; comment\nSELECT ';' AS x, \"a;b\" FROM ${namespace}.t; -- trailing\n\nSELECT 2 FROM ${namespace}.u;\n"
    assert split_statements(sql) == ["SELECT ';' AS x, \"a;b\" FROM ${namespace}.t", "SELECT 2 FROM ${namespace}.u"]
    assert referenced_tables("CREATE OR REPLACE VIEW ${namespace}.v_x AS SELECT * FROM ${namespace}.a JOIN ${namespace}.v_y") == ["a", "v_y"]
    bad = tmp_path / "bad.sql"
    bad.write_text("-- uses a placeholder nobody fills\nSELECT * FROM ${schema}.products;")
    with pytest.raises(SqlFileError, match=r"bad.sql: unknown placeholder\(s\) \['\$\{schema\}'\]"):
        load_file(bad)
    from annomine.sql_runner import render
    assert render("SELECT * FROM ${namespace}.products", "main.annomine") == "SELECT * FROM main.annomine.products"
    with pytest.raises(ValueError, match="namespace"):
        render("SELECT 1", "main; DROP TABLE x")
    assert default_sql_dir() == ROOT / "sql"


def test_cli_prints_a_query(demo, capsys):
    from annomine.sql_runner import main

    ctx, *_ = demo
    conf = Path(ctx.project.warehouse).parent / "conf.yaml"
    assert main(["--conf", str(conf), "judge_vs_human"]) == 0
    out = capsys.readouterr().out
    assert "-- judge_vs_human" in out and "tier3" in out and "-- difficulty_mix_by_segment" not in out
    assert main(["--list"]) == 0
    assert "tier_disagreement" in capsys.readouterr().out


def test_exploration_notebook_creates_the_views_and_displays_every_query(demo, spark, capsys):
    ctx, P, results, _ = demo
    conf = Path(ctx.project.warehouse).parent / "conf.yaml"
    ns = run_notebook(NOTEBOOKS / "explore_curated_tables.py",
                      {"catalog": "", "schema": ctx.project.schema, "conf": str(conf)}, spark)
    out = capsys.readouterr().out
    assert "v_training_sets: created in " + ctx.project.schema in out
    shown = ns["displayed"]
    assert len(shown) == len(results) + 1  # every example query, then the %sql cell
    assert [tuple(r) for r in shown[0].collect()] == [tuple(r) for r in results["difficulty_mix_by_segment"].dataframe.collect()]
    by_channels = {(r.channels, r.annotation_status): r.n_candidates for r in shown[-1].collect()}
    assert by_channels == {("ann", "graded"): 1, ("lexical", "graded"): 1, ("lexical+bm25", "graded"): 1,
                           ("lexical+bm25", "stale"): 1, ("lexical+bm25+ann", "graded"): 2, ("none", "failed"): 1,
                           ("none", "pending"): 1}


def test_tables_doc_is_generated_from_the_schemas():
    from annomine.docs_gen import tables_markdown

    doc = (ROOT / "docs" / "tables.md").read_text()
    assert doc == tables_markdown(), "docs/tables.md is stale: run `python -m annomine.docs_gen > docs/tables.md`"
    for spec in TABLES.values():
        assert f"| [`{spec.name}`](#{spec.name}) | {', '.join(spec.key)} |" in doc
