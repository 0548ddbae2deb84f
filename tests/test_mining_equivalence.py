"""The optimised `mine_candidates` against a frozen copy of the one before issue 20 (tests/mining_reference.py).

A generated log (benchmarks/gen_logs.py: 150 queries x 3 channels x top 100 over 5,000 products) plus
an older run that run selection must ignore, duplicate rows with better scores at equal ranks and
null scores. Every (query, product) of every class must come out of both pipelines, with the same
rank metadata, class, level, polarity, query and segment, and the same TF-IDF similarity to 1e-9.
Two rule sets: the defaults (caps 50/50 bind, max-df 250 blocks the frequent terms) and tight caps
with other quotas, a mining depth, a narrower band and another seed.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pandas as pd
import pytest

from annomine import mining
from annomine.mining import MiningRules
from annomine.schemas import TABLES
from tests import mining_reference as reference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gen_logs import generate  # noqa: E402

KEY = ["query_id", "product_id"]
SIMILARITY_TOLERANCE = 1e-9

RULE_SETS = {
    "defaults": MiningRules(),
    "tight": MiningRules(max_rank=60, max_positives=7, max_negatives=9, blocking_max_df=40, token_band_low=0.1,
                         token_band_high=0.5, random_pool_size=300, seed=5, hard_negative_top_k=80,
                         class_quotas={"easy_positive": 2, "hard_positive": 6, "hard_negative": 3,
                                       "token_similar_negative": 4, "random_negative": 4}),
}


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    """(logs, products, queries, n_products) as DataFrames over the generated Parquet files."""
    out = tmp_path_factory.mktemp("gen")
    generate(out, rows=45_000, n_products=5_000, top_k=100, seed=11)
    logs = spark.read.parquet(str(out / "logs")).select(*TABLES["retrieval_logs"].schema.fieldNames())
    first = logs.orderBy("query_id", "channel", "rank", "product_id").limit(300).collect()
    old = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)
    extra = []
    for i, r in enumerate(first):
        row = r.asDict()
        if i % 3 == 0:  # same rank, better score: it must win the dedupe
            extra.append({**row, "score": row["score"] + 0.5})
        elif i % 3 == 1:  # a worse rank with a null or a higher score (neither wins), an older run (ignored)
            extra.append({**row, "score": None, "rank": row["rank"] + 3})
            extra.append({**row, "score": row["score"] + 10.0, "rank": row["rank"] + 2})
            extra.append({**row, "run_id": "old-" + row["channel"], "logged_at": old, "rank": 1,
                          "product_id": f"p{(i * 37) % 5000:08d}"})
        else:  # an exact duplicate
            extra.append(row)
    logs = logs.unionByName(spark.createDataFrame(extra, logs.schema))
    products = spark.read.parquet(str(out / "products.parquet"))
    queries = spark.read.parquet(str(out / "queries.parquet"))
    return logs, products, queries, 5_000


def _mine(fn, world, rules, scratch: Path) -> pd.DataFrame:
    from jobs.mine import parquet_checkpoint

    logs, products, queries, n = world
    spark = logs.sparkSession
    mined = fn(logs, products, queries, rules, n_products=n, checkpoint=parquet_checkpoint(spark, scratch))
    return mined.drop("mined_at").toPandas().sort_values(KEY).reset_index(drop=True)


@pytest.mark.parametrize("name", list(RULE_SETS))
def test_same_candidates_as_the_reference(world, name, tmp_path):
    rules = RULE_SETS[name]
    rules.validate()
    new = _mine(mining.mine_candidates, world, rules, tmp_path / "new")
    ref = _mine(reference.mine_candidates, world, rules, tmp_path / "ref")

    # the comparison means something: every class, caps that bind, a blocking cap below the frequent terms' df
    counts = ref.groupby("candidate_class").size().to_dict()
    assert set(counts) == set(mining.CLASSES), counts
    negatives = ref[ref.polarity == "negative"].groupby("query_id").size()
    positives = ref[ref.polarity == "positive"].groupby("query_id").size()
    assert negatives.max() == rules.max_negatives
    assert positives.max() == rules.max_positives if name == "tight" else positives.max() <= rules.max_positives
    texts = world[1].select("text").toPandas()["text"]
    assert texts.str.contains(r"\bt0\b").sum() > rules.max_df(world[3])

    for cls in mining.CLASSES:
        a = set(map(tuple, new.loc[new.candidate_class == cls, KEY].values))
        b = set(map(tuple, ref.loc[ref.candidate_class == cls, KEY].values))
        assert a == b, f"{cls}: {len(a - b)} pairs only in the new pipeline, {len(b - a)} only in the reference"
    assert len(new) == len(ref)
    for col in new.columns:
        if col == "token_similarity":
            diff = (new[col] - ref[col]).abs().max()
            assert diff <= SIMILARITY_TOLERANCE, f"token_similarity differs by up to {diff}"
        else:
            pd.testing.assert_series_equal(new[col], ref[col], check_dtype=False, obj=col)


def test_without_a_checkpoint_the_same_candidates(world, tmp_path):
    """The job's path on Unity Catalog (no checkpoint: the pivot is the tie rule's one aggregation) mines the
    candidates of the checkpointed path (the pivot by cells)."""
    logs, products, queries, n = world
    rules = RULE_SETS["defaults"]
    plain = mining.mine_candidates(logs, products, queries, rules, n_products=n).drop("mined_at").toPandas()
    plain = plain.sort_values(KEY).reset_index(drop=True)
    checked = _mine(mining.mine_candidates, world, rules, tmp_path / "checkpointed")
    assert len(plain) == len(checked) > 0
    diff = (plain["token_similarity"] - checked["token_similarity"]).abs().max()
    assert diff <= SIMILARITY_TOLERANCE, f"token_similarity differs by up to {diff}"
    pd.testing.assert_frame_equal(plain.drop(columns="token_similarity"), checked.drop(columns="token_similarity"),
                                  check_dtype=False)


@pytest.mark.parametrize("checkpoint", [None, lambda df, name: df], ids=["tie-rule-aggregation", "cells"])
def test_one_aggregation_keeps_the_dedupe_rule(spark, checkpoint):
    """`pivot_channels` over raw rows = `dedupe_logs` then the old per-channel pivot: best rank, then the
    highest score among equal ranks, null scores last, a channel without rows null; with a checkpoint (the
    pivot by cells) and without (the tie rule's one aggregation)."""
    t = dt.datetime(2026, 1, 1)
    rows = [("r", "q", "query", "ann", "p", 7, 0.5, t, "t"), ("r", "q", "query", "ann", "p", 7, 0.9, t, "t"),
            ("r", "q", "query", "ann", "p", 9, 5.0, t, "t"), ("r", "q", "query", "lexical", "p", 2, None, t, "t"),
            ("r", "q", "query", "lexical", "p", 2, 0.1, t, "t"), ("r", "q", "query", "lexical", "p", 3, 9.0, t, "t"),
            ("r", "q", "query", "bm25", "p", 4, None, t, "t")]
    logs = spark.createDataFrame(rows, TABLES["retrieval_logs"].schema)
    row = mining.with_rank_metadata(mining.pivot_channels(logs, checkpoint)).collect()[0]
    assert (row["rank_ann"], row["score_ann"]) == (7, 0.9)
    assert (row["rank_lexical"], row["score_lexical"]) == (2, 0.1)
    assert (row["rank_bm25"], row["score_bm25"]) == (4, None)
    assert (row["n_channels"], row["best_rank"], row["worst_rank"], row["rank_spread"]) == (3, 2, 7, 5)
    ref = reference.pivot_channels(reference.dedupe_logs(logs)).collect()[0]
    assert {k: ref[k] for k in row.asDict()} == row.asDict()


def _by_pair(rows) -> dict:
    """Pivoted rows by (query_id, product_id), NaN written as the string "nan" so that it compares equal."""
    def plain(v):
        return "nan" if isinstance(v, float) and v != v else v
    return {(r["query_id"], r["product_id"]): {k: plain(v) for k, v in r.asDict().items()} for r in rows}


def test_one_row_cells_and_repeated_cells_pivot_as_the_tie_rule_alone(spark):
    """The pivot with a checkpoint reads one-row cells by min/max and resolves only pairs with a repeated row by
    the tie rule: the result equals the tie rule's pivot on every row, a NaN, null or equal score of a one-row cell
    included, and a pair whose repeat sits in another channel than its one-row cells."""
    t = dt.datetime(2026, 1, 1)
    nan = float("nan")
    rows = [("q", "a", "ann", 3, nan), ("q", "a", "lexical", 1, None), ("q", "a", "bm25", 2, -1e300),
            ("q", "b", "ann", 5, 0.2), ("q", "b", "ann", 5, nan), ("q", "b", "lexical", 4, 0.7),
            ("q", "c", "bm25", 8, None), ("q", "c", "bm25", 8, 1.5), ("q", "c", "bm25", 6, 0.1),
            ("r", "a", "lexical", 2, 0.4), ("r", "b", "ann", 1, 0.3), ("r", "b", "ann", 1, 0.3)]
    logs = spark.createDataFrame([("run", q, "query", ch, p, rank, score, t, "t") for q, p, ch, rank, score in rows],
                                 TABLES["retrieval_logs"].schema)
    pivoted = _by_pair(mining.pivot_channels(logs, checkpoint=lambda df, name: df).collect())
    assert pivoted == _by_pair(mining.pivot_best_rows(logs).collect())
    assert len(pivoted) == 5
    assert (pivoted["q", "a"]["score_ann"], pivoted["q", "a"]["score_lexical"]) == ("nan", None)
    assert (pivoted["q", "b"]["rank_ann"], pivoted["q", "b"]["score_ann"]) == (5, 0.2)
    assert (pivoted["q", "c"]["rank_bm25"], pivoted["q", "c"]["score_bm25"]) == (6, 0.1)
