"""Structured mining on hand-built logs: every class, every edge, caps, blocking, the job end to end."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from pyspark.sql import functions as F

from annomine import mining
from annomine.mining import MiningRules
from annomine.schemas import TABLES

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
T1 = dt.datetime(2026, 1, 2, 12, 0, 0)

QUERIES = [("q1", "red leather sofa", "head"), ("q2", "garden hose reel", None), ("q3", "stainless steel kettle", "tail")]

PRODUCTS = {
    # returned by channels for q1
    "pA": "red leather sofa three seater",
    "pB": "leather sofa brown two seater",
    "pC": "red sofa bed fabric",
    "pD": "sofa cover stretch grey",
    "pE": "leather care cream",
    "pF": "red leather armchair",
    "pG": "red leather sofa recliner",
    "pH": "wooden coffee table",
    "pI": "floor lamp brass",
    "pJ": "bookshelf oak",
    "pK": "corner sofa leather red",
    # never returned for q1: token-similar or random material
    "pL": "red wine glasses set",
    "pM": "leather belt black",
    "pN": "velvet sofa green",
    "pO": "garden hose 30m",
    "pP": "hose reel cart",
    "pQ": "garden chair folding",
    "pR": "stainless steel kettle 1.7 litre",
    "pS": "electric kettle white",
    "pT": "steel wool pads",
    "pU": "red leather sofa",
    "pV": "bath towel cotton",
    "pW": "phone charger cable",
    "pX": "desk organiser",
}


def log(run, q, ch, p, rank, score=None, at=T1, query=None):
    query = query or dict((k, v) for k, v, _ in QUERIES).get(q, "")
    return (run, q, query, ch, p, rank, float(score if score is not None else 1.0 / max(rank, 1)), at, "test")


LOGS = [
    # q1: latest runs are r1 (r0 is an older lexical run that must be ignored)
    log("r0", "q1", "lexical", "pK", 1, at=T0),
    log("r1", "q1", "lexical", "pA", 1), log("r1", "q1", "bm25", "pA", 2), log("r1", "q1", "ann", "pA", 3),  # easy
    log("r1", "q1", "lexical", "pB", 5), log("r1", "q1", "bm25", "pB", 60),  # hard positive, product in two channels
    log("r1", "q1", "bm25", "pC", 10),  # hard positive via bm25 alone (beats the one-channel hard-negative rule)
    log("r1", "q1", "ann", "pD", 9), log("r1", "q1", "ann", "pD", 7), log("r1", "q1", "ann", "pD", 7),  # duplicates
    log("r1", "q1", "lexical", "pE", 70),  # lexical-only beyond the hard-positive top-50: hard negative
    log("r1", "q1", "lexical", "pF", 3), log("r1", "q1", "ann", "pF", 20),  # two channels, no rule: unclassified
    log("r1", "q1", "lexical", "pG", 1), log("r1", "q1", "bm25", "pG", 1), log("r1", "q1", "ann", "pG", 15),  # not easy
    log("r1", "q1", "ann", "pH", 5), log("r1", "q1", "ann", "pI", 5),  # tie: both hard negatives
    log("r1", "q1", "ann", "pJ", 150),  # beyond the hard-negative top-100: unclassified
    # q2: all three channels
    log("r1", "q2", "lexical", "pO", 1), log("r1", "q2", "bm25", "pO", 1), log("r1", "q2", "ann", "pO", 1),
    log("r1", "q2", "ann", "pQ", 4),
    # q3: the ann channel is missing for this query
    log("r1", "q3", "lexical", "pR", 1), log("r1", "q3", "bm25", "pR", 1), log("r1", "q3", "lexical", "pS", 2),
]

LOG_SCHEMA = TABLES["retrieval_logs"].schema

EXPECTED_CHANNEL = {
    ("q1", "pA"): "easy_positive", ("q1", "pB"): "hard_positive", ("q1", "pC"): "hard_positive",
    ("q1", "pD"): "hard_negative", ("q1", "pE"): "hard_negative", ("q1", "pH"): "hard_negative",
    ("q1", "pI"): "hard_negative",
    ("q2", "pO"): "easy_positive", ("q2", "pQ"): "hard_negative",
    ("q3", "pR"): "hard_positive", ("q3", "pS"): "hard_positive",
}
UNCLASSIFIED = {("q1", "pF"), ("q1", "pG"), ("q1", "pJ")}

OPEN = dict(blocking_max_df_ratio=1.0, random_pool_size=1000, max_positives=100, max_negatives=100,
            class_quotas={})


@pytest.fixture
def checkpoint(spark, tmp_path):
    """Materialise shared intermediates as the job does (small plans, each step computed once)."""
    from jobs.mine import parquet_checkpoint

    return parquet_checkpoint(spark, tmp_path / "scratch")


@pytest.fixture
def frames(spark, checkpoint):
    logs = spark.createDataFrame(LOGS, LOG_SCHEMA)
    products = spark.createDataFrame(list(PRODUCTS.items()), "product_id string, text string")
    queries = spark.createDataFrame(QUERIES, "query_id string, query string, segment string")
    return logs, products, queries, checkpoint


def _analyze(text: str) -> list[str]:
    return [t for t in re.split("[^a-z0-9]+", text.lower()) if len(t) >= 2 and t not in mining.STOPWORDS]


def sklearn_similarity() -> dict[tuple[str, str], float]:
    """Independent TF-IDF cosine (scikit-learn) of every (query, product)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    ids = list(PRODUCTS)
    vec = TfidfVectorizer(analyzer=_analyze, sublinear_tf=True, smooth_idf=True, norm="l2")
    P = vec.fit_transform([PRODUCTS[p] for p in ids])
    Q = vec.transform([q for _, q, _ in QUERIES])
    sims = (Q @ P.T).toarray()
    return {(q, p): float(sims[i, j]) for i, (q, _, _) in enumerate(QUERIES) for j, p in enumerate(ids)}


def _mine(frames, **rules):
    logs, products, queries, checkpoint = frames
    return mining.mine_candidates(logs, products, queries, MiningRules(**rules), checkpoint=checkpoint)


def test_every_class_exactly(frames):
    rules = MiningRules(**OPEN)
    rows = {(r["query_id"], r["product_id"]): r.asDict() for r in _mine(frames, **OPEN).collect()}
    sims = sklearn_similarity()
    returned = {(r[1], r[4]) for r in LOGS if r[0] == "r1"}
    expected = dict(EXPECTED_CHANNEL)
    for (q, p), s in sims.items():
        if (q, p) in returned:
            continue
        if rules.token_band_low <= s <= rules.token_band_high:
            expected[(q, p)] = "token_similar_negative"
        elif s < rules.random_max_similarity:
            expected[(q, p)] = "random_negative"
    assert {k: v["candidate_class"] for k, v in rows.items()} == expected
    assert set(rows).isdisjoint(UNCLASSIFIED)
    assert rows.get(("q1", "pK"), {}).get("n_channels", 0) == 0  # only in the older lexical run
    assert ("q1", "pU") not in rows  # never returned and more similar than the band: not a negative
    classes = {v["candidate_class"] for v in rows.values()}
    assert classes == set(mining.CLASSES)
    for v in rows.values():
        assert v["level"] == mining.CLASSES[v["candidate_class"]]
        assert v["polarity"] == ("positive" if v["level"] <= 2 else "negative")
        assert v["token_similarity"] == pytest.approx(sims[(v["query_id"], v["product_id"])], abs=1e-6)
    # rank metadata
    a, b, d = rows[("q1", "pA")], rows[("q1", "pB")], rows[("q1", "pD")]
    assert (a["rank_lexical"], a["rank_bm25"], a["rank_ann"], a["n_channels"]) == (1, 2, 3, 3)
    assert (a["best_rank"], a["worst_rank"], a["rank_spread"]) == (1, 3, 2)
    assert (b["rank_lexical"], b["rank_bm25"], b["rank_ann"], b["score_ann"], b["n_channels"]) == (5, 60, None, None, 2)
    assert (b["best_rank"], b["worst_rank"], b["rank_spread"]) == (5, 60, 55)
    assert (d["rank_ann"], d["score_ann"], d["n_channels"]) == (7, pytest.approx(1 / 7), 1)  # best duplicate kept
    tok = next(v for v in rows.values() if v["candidate_class"] == "token_similar_negative")
    assert tok["n_channels"] == 0 and tok["best_rank"] is None
    assert rows[("q1", "pA")]["segment"] == "head" and rows[("q2", "pO")]["segment"] is None
    assert rows[("q1", "pA")]["query"] == "red leather sofa"
    assert rows[("q1", "pA")]["mined_at"] is not None


def test_configurable_rules(frames):
    # hard positives from the lexical channel alone: pC (bm25 only) falls back to a hard negative
    rows = {(r["query_id"], r["product_id"]): r["candidate_class"]
            for r in _mine(frames, **OPEN, hard_positive_channels=["lexical"]).where("n_channels > 0").collect()}
    assert rows[("q1", "pC")] == "hard_negative" and rows[("q1", "pB")] == "hard_positive"
    # a wider easy top-K turns pG (ann rank 15) into an easy positive
    rows = {(r["query_id"], r["product_id"]): r["candidate_class"]
            for r in _mine(frames, **OPEN, easy_top_k=20).where("n_channels > 0").collect()}
    assert rows[("q1", "pG")] == "easy_positive"
    # a mining depth of 60: pE (lexical rank 70 only) counts as found by no channel
    rows = {(r["query_id"], r["product_id"]): r for r in _mine(frames, **OPEN, max_rank=60).collect()}
    assert rows[("q1", "pB")]["rank_bm25"] == 60 and rows[("q1", "pB")]["candidate_class"] == "hard_positive"
    assert ("q1", "pE") not in rows or rows[("q1", "pE")]["n_channels"] == 0
    with pytest.raises(ValueError, match="hard_positive_channels"):
        MiningRules(hard_positive_channels=["lexical", "ann"]).validate()
    with pytest.raises(ValueError, match="unknown channel"):
        MiningRules(easy_channels=["lexical", "sparse"]).validate()
    with pytest.raises(ValueError, match="token band"):
        MiningRules(token_band_low=0.7, token_band_high=0.6).validate()


def test_run_selection_and_dedupe(spark, frames):
    logs = frames[0]
    latest = {(r["run_id"], r["channel"]) for r in mining.select_runs(logs).collect()}
    assert latest == {("r1", "lexical"), ("r1", "bm25"), ("r1", "ann")}
    chosen = mining.select_runs(logs, ["r0"]).collect()
    assert [(r["query_id"], r["product_id"]) for r in chosen] == [("q1", "pK")]
    dup = spark.createDataFrame([
        log("r1", "q1", "ann", "pD", 9), log("r1", "q1", "ann", "pD", 7, score=0.5),
        log("r1", "q1", "ann", "pD", 7, score=0.9), log("r1", "q1", "ann", "pD", 7, score=0.9)], LOG_SCHEMA)
    out = mining.pivot_channels(dup).collect()
    assert [(r["rank_ann"], r["score_ann"], r["rank_lexical"], r["score_lexical"]) for r in out] == [(7, 0.9, None, None)]


def test_bad_log_rows_are_quarantined(spark):
    bad = spark.createDataFrame([
        log("r1", "q1", "lexical", "pA", 1), log("r1", "q1", "sparse", "pA", 1), log("r1", "q1", "ann", None, 2),
        log("r1", "q1", "bm25", "pB", 0), log("r1", None, "bm25", "pB", 3)], LOG_SCHEMA)
    good, rejected = mining.split_logs(bad)
    assert good.count() == 1
    reasons = sorted(r["reason"] for r in mining.quarantine_rows(rejected).collect())
    assert reasons == ["channel must be one of lexical/bm25/ann, got sparse", "product_id is null or empty",
                       "query_id is null or empty", "rank must be >= 1, got 0"]


def test_caps_and_quotas(spark, checkpoint):
    # q1: 12 hard negatives (ann only, ranks with ties), 6 hard positives; catalog of 40 filler products
    logs = [log("r1", "q1", "ann", f"n{i:02d}", 1 + i // 2, query="alpha") for i in range(12)]
    logs += [log("r1", "q1", "lexical", f"h{i:02d}", 1 + i, query="alpha") for i in range(6)]
    products = [(f"n{i:02d}", f"item {i}") for i in range(12)] + [(f"h{i:02d}", f"thing {i}") for i in range(6)]
    products += [(f"r{i:02d}", f"filler {i}") for i in range(40)]
    lf = spark.createDataFrame(logs, LOG_SCHEMA)
    pf = spark.createDataFrame(products, "product_id string, text string")
    qf = spark.createDataFrame([("q1", "alpha", "torso")], "query_id string, query string, segment string")
    rules = MiningRules(max_positives=4, max_negatives=5, random_pool_size=100,
                        class_quotas={"hard_negative": 3, "token_similar_negative": 1, "random_negative": 2})
    rows = mining.mine_candidates(lf, pf, qf, rules, checkpoint=checkpoint).collect()
    by = {}
    for r in rows:
        by.setdefault(r["candidate_class"], []).append(r["product_id"])
    # positives: the 4 best-ranked hard positives; negatives: 3 hard (best ranks, ties -> product_id) + 2 random
    assert sorted(by["hard_positive"]) == ["h00", "h01", "h02", "h03"]
    assert sorted(by["hard_negative"]) == ["n00", "n01", "n02"]
    assert len(by["random_negative"]) == 2 and all(p.startswith("r") for p in by["random_negative"])
    assert "token_similar_negative" not in by  # no product shares a term with "alpha"
    # unused quota (no token-similar) is refilled when room is left: quota 2 random but cap 5, 3 hard
    rules2 = MiningRules(max_positives=4, max_negatives=8, random_pool_size=100,
                         class_quotas={"hard_negative": 3, "token_similar_negative": 3, "random_negative": 2})
    rows2 = mining.mine_candidates(lf, pf, qf, rules2, checkpoint=checkpoint).collect()
    neg = [r for r in rows2 if r["polarity"] == "negative"]
    assert len(neg) == 8
    assert sum(r["candidate_class"] == "hard_negative" for r in neg) >= 3
    assert sum(r["candidate_class"] == "random_negative" for r in neg) >= 2
    # deterministic: same seed, same sample; another seed, another sample
    again = sorted(r["product_id"] for r in mining.mine_candidates(lf, pf, qf, rules, checkpoint=checkpoint).collect())
    assert again == sorted(r["product_id"] for r in rows)
    other = MiningRules(**{**rules.__dict__, "seed": 99})
    sample = sorted(r["product_id"] for r in mining.mine_candidates(lf, pf, qf, other, checkpoint=checkpoint).collect()
                    if r["candidate_class"] == "random_negative")
    assert sample != sorted(by["random_negative"])


def test_blocking_skips_frequent_terms_but_scores_exactly(spark):
    # "sofa" is in every product (df 6 > max_df 1); "velvet" is rare (df 1)
    products = spark.createDataFrame([("v", "velvet sofa"), ("a", "sofa one"), ("b", "sofa two"), ("c", "sofa three"),
                                      ("d", "sofa four"), ("e", "sofa five")], "product_id string, text string")
    queries = spark.createDataFrame([("q", "velvet sofa")], "query_id string, query string")
    pt, qt = mining.tfidf_tables(products, queries, 6)
    pairs = {(r["query_id"], r["product_id"]) for r in mining.blocked_pairs(pt, qt, max_df=1).collect()}
    assert pairs == {("q", "v")}  # no query x catalog cross join: "sofa" alone does not block
    scored = mining.score_pairs(spark.createDataFrame([("q", "v"), ("q", "a")], "query_id string, product_id string"), pt, qt)
    sims = {r["product_id"]: r["token_similarity"] for r in scored.collect()}
    assert sims["v"] == pytest.approx(1.0)  # identical text: cosine 1 (frequent term counted too)
    assert 0.0 < sims["a"] < 0.5


def test_report_counts(frames):
    mined = _mine(frames, **OPEN)
    rows = [r.asDict() for r in mining.mining_report(mined).collect()]
    cls = {r["candidate_class"]: r["n_candidates"] for r in rows if r["dimension"] == "class"}
    assert cls["easy_positive"] == 2 and cls["hard_positive"] == 4 and cls["hard_negative"] == 5
    ann_hard = next(r for r in rows if (r["dimension"], r["value"], r["candidate_class"]) == ("channel", "ann", "hard_negative"))
    assert ann_hard["n_candidates"] == 4 and ann_hard["n_queries"] == 2  # pD, pH, pI (q1) and pQ (q2)
    seg = {(r["value"], r["candidate_class"]): r["n_candidates"] for r in rows if r["dimension"] == "segment"}
    assert seg[("tail", "hard_positive")] == 2 and seg[("none", "easy_positive")] == 1
    text = mining.format_report(rows)
    assert "token_similar_negative" in text and "random_negative" in text


def test_job_end_to_end(ctx, tmp_path):
    from jobs import mine

    spark = ctx.spark
    now = F.current_timestamp()
    products = spark.createDataFrame(list(PRODUCTS.items()), "product_id string, text string").select(
        "product_id", F.col("text").alias("title"), F.lit("").alias("description"), F.lit(None).cast("string").alias("brand"),
        F.lit(None).cast("string").alias("category"), F.lit(None).cast("string").alias("attributes"), "text",
        F.sha2("text", 256).alias("content_hash"), F.lit("test").alias("source"), now.alias("ingested_at"))
    ctx.tables.overwrite("products", products)
    queries = spark.createDataFrame(QUERIES, "query_id string, query string, segment string").select(
        "query_id", "query", F.lit(1).cast("long").alias("frequency"), "segment", F.lit("labelled").alias("origin"),
        F.lit("test").alias("source"), now.alias("ingested_at"))
    ctx.tables.overwrite("queries", queries)
    bad = [log("r1", "q1", "sparse", "pA", 1)]
    ctx.tables.overwrite("retrieval_logs", spark.createDataFrame(LOGS + bad, LOG_SCHEMA))
    cfg = mine.MineConfig(**OPEN)
    stats = mine.run(ctx, cfg)
    assert stats["n_quarantined_log_rows"] == 1
    levels = dict(spark.sql(f"SELECT level, count(*) AS n FROM {ctx.tables.qualified_name('mined_candidates')} "
                            "GROUP BY level").collect())
    assert set(levels) == {1, 2, 3, 4, 5}
    assert sum(levels.values()) == stats["n_candidates"]
    report = ctx.tables.read("mined_report").where("dimension = 'class'").collect()
    assert {r["candidate_class"]: r["n_candidates"] for r in report} == {c: levels[lvl] for c, lvl in mining.CLASSES.items()}
    quarantined = ctx.tables.read("quarantine").where("target_table = 'mined_candidates'").collect()
    assert len(quarantined) == 1 and "sparse" in quarantined[0]["reason"]
    # MLflow: the chart and the counts are logged
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=ctx.project.tracking_uri)
    run = client.get_run(stats["mlflow_run_id"])
    assert run.data.metrics["n_easy_positive"] == levels[1]
    assert "mining_report.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # a re-run rewrites the table: same rows, no duplicates, quarantine not duplicated
    mine.run(ctx, mine.MineConfig(**OPEN, log_mlflow=False))
    assert ctx.tables.read("mined_candidates").count() == stats["n_candidates"]
    assert ctx.tables.read("quarantine").where("target_table = 'mined_candidates'").count() == 1


def test_a_query_is_mined_with_its_text_in_the_queries_table_not_a_stale_logged_one(spark, checkpoint):
    logs = spark.createDataFrame([log("r1", "q2", "lexical", "pO", 1, query="leather sofa"),
                                  log("r1", "q2", "bm25", "pO", 1, query="leather sofa")], LOG_SCHEMA)
    products = spark.createDataFrame(list(PRODUCTS.items()), "product_id string, text string")
    queries = spark.createDataFrame(QUERIES, "query_id string, query string, segment string")
    rows = mining.mine_candidates(logs, products, queries, MiningRules(**OPEN), checkpoint=checkpoint).collect()
    texts = dict((q, t) for q, t, _ in QUERIES)
    assert rows and {r["query"] for r in rows} == {texts["q2"]} != {"leather sofa"}
    # the token-similar band is the new text's: garden products, not leather ones
    token = {r["product_id"] for r in rows if r["candidate_class"] == "token_similar_negative"}
    assert token and not token & {"pA", "pB", "pE", "pM", "pU"}


def test_a_query_the_queries_table_lacks_is_mined_with_its_greatest_logged_text(spark, checkpoint):
    logs = spark.createDataFrame([log("r1", "q9", "lexical", "pO", 1, query="garden hose"),
                                  log("r1", "q9", "bm25", "pO", 1, query="garden hose reel"),
                                  log("r1", "q1", "lexical", "pA", 1, query="stale logged text")], LOG_SCHEMA)
    products = spark.createDataFrame(list(PRODUCTS.items()), "product_id string, text string")
    queries = spark.createDataFrame(QUERIES, "query_id string, query string, segment string")
    rows = mining.mine_candidates(logs, products, queries, MiningRules(**OPEN), checkpoint=checkpoint).collect()
    texts = {(r["query_id"], r["query"], r["segment"]) for r in rows}
    assert texts == {("q9", "garden hose reel", None), ("q1", "red leather sofa", "head")}
