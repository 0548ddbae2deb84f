"""Validation of users' own retrieval logs: every refusal reason, and ingestion from CSV and Parquet."""

from __future__ import annotations

import pandas as pd
import pytest

from annomine.log_validation import LOG_COLUMNS, validate_retrieval_logs
from annomine.sources import SourceConfig
from jobs.ingest_logs import default_run_id, ingest_retrieval_logs

GOOD = [
    # run_id, query_id, query, channel, product_id, rank, score, logged_at
    ("r1", "q1", "red pillow", "lexical", "p1", "1", "0.9", "2024-05-01 10:00:00"),
    ("r1", "q1", "red pillow", "lexical", "p2", "2", "0.5", "2024-05-01 10:00:00"),
    ("r1", "q1", "red pillow", " BM25 ", "p1", "1", "12.5", None),       # channel is normalised
    ("", "q1", "red pillow", "ann", "p2", "1", None, None),              # run id defaults, score optional
    ("r1", "q1", "red pillow", "lexical", "p2", "2", "0.5", "2024-05-01 10:00:00"),  # exact duplicate: merged
]
BAD = [
    (("r1", None, "x", "bm25", "p1", "1", "1", None), "missing query_id"),
    (("r1", "q2", "x", "bm25", " ", "1", "1", None), "missing product_id"),
    (("r1", "q2", "x", None, "p1", "1", "1", None), "missing channel"),
    (("r1", "q2", "x", "dense", "p1", "1", "1", None), "unknown channel 'dense'"),
    (("r1", "q2", "x", "bm25", "p1", None, "1", None), "missing rank"),
    (("r1", "q2", "x", "bm25", "p1", "0", "1", None), "rank must be a positive integer, got '0'"),
    (("r1", "q2", "x", "bm25", "p1", "-3", "1", None), "rank must be a positive integer, got '-3'"),
    (("r1", "q2", "x", "bm25", "p1", "2.5", "1", None), "rank must be a positive integer, got '2.5'"),
    (("r1", "q2", "x", "bm25", "p1", "first", "1", None), "rank must be a positive integer, got 'first'"),
    (("r1", "q2", "x", "bm25", "p1", "1", "high", None), "score is not a number: 'high'"),
    (("r1", "q2", "x", "bm25", "p1", "1", "1", "yesterday"), "logged_at is not a timestamp: 'yesterday'"),
    (("r1", "q2", "x", "bm25", "p9", "1", "1", None), "unknown product_id"),
]
DUPLICATE_RANK = [("r1", "q3", "x", "ann", "p1", "1", "0.9", None), ("r1", "q3", "x", "ann", "p2", "1", "0.8", None)]
DUPLICATE_PRODUCT = [("r1", "q4", "x", "ann", "p1", "1", "0.9", None), ("r1", "q4", "x", "ann", "p1", "2", "0.8", None)]


def _frame(spark, rows):
    return spark.createDataFrame(pd.DataFrame(rows, columns=LOG_COLUMNS).astype(object).where(lambda d: d.notna(), None),
                                 ", ".join(f"{c} string" for c in LOG_COLUMNS))


def test_every_refusal_reason(spark):
    rows = GOOD + [r for r, _ in BAD] + DUPLICATE_RANK + DUPLICATE_PRODUCT
    products = spark.createDataFrame([("p1",), ("p2",)], "product_id string")
    good, bad = validate_retrieval_logs(_frame(spark, rows), "logs.csv", "log-default", products)
    good = good.toPandas()
    bad = bad.toPandas()
    assert len(good) == 4
    assert set(good["run_id"]) == {"r1", "log-default"}
    assert set(good["channel"]) == {"lexical", "bm25", "ann"}
    assert good["rank"].tolist() and (good["rank"] >= 1).all()
    assert good.loc[good["channel"] == "ann", "score"].isna().all()
    assert good["logged_at"].notna().all() and (good["source"] == "logs.csv").all()
    reasons = bad["reason"].tolist()
    for _, expected in BAD:
        assert sum(r.startswith(expected) for r in reasons) == 1, (expected, reasons)
    assert sum(r.startswith("rank 1 used by 2 products") for r in reasons) == 2
    assert sum(r.startswith("product_id listed at 2 ranks") for r in reasons) == 2
    assert len(bad) == len(BAD) + 4
    assert bad["record_key"].is_unique and (bad["target_table"] == "retrieval_logs").all()
    assert bad["raw"].str.contains('"run_id":"r1"').all()  # the raw row is kept as JSON


def test_ingest_csv_and_parquet(ctx, tmp_path):
    ctx.tables.merge("products", ctx.spark.createDataFrame(
        [("p1", "t", "", None, None, None, "t", "h1", "test", None), ("p2", "u", "", None, None, None, "u", "h2", "test", None)],
        ctx.tables.spec("products").schema))
    csv_path = tmp_path / "logs.csv"
    pd.DataFrame(GOOD + [BAD[3][0], BAD[5][0]], columns=LOG_COLUMNS).to_csv(csv_path, index=False)
    line = ingest_retrieval_logs(ctx, SourceConfig(path=str(csv_path)))
    assert line.startswith("retrieval_logs: 7 rows read, 4 loaded, 2 quarantined, 1 duplicate rows merged")
    assert "unknown channel 'dense'" in line
    again = ingest_retrieval_logs(ctx, SourceConfig(path=str(csv_path)))  # re-ingest: no duplicates
    assert again == line
    assert ctx.tables.read("retrieval_logs").count() == 4
    assert ctx.tables.read("quarantine").count() == 2
    logs = ctx.tables.read("retrieval_logs").toPandas()
    assert default_run_id(SourceConfig(path=str(csv_path))) in set(logs["run_id"])

    # Parquet with the user's own column names, mapped; no run_id column: one id per file.
    pq_path = tmp_path / "search_logs.parquet"
    pd.DataFrame({"qid": ["q7", "q7", "q7"], "engine": ["bm25", "bm25", "bm25"], "sku": ["p1", "p2", "p1"],
                  "position": [1, 2, 3], "score": [3.0, 2.0, 1.0]}).to_parquet(pq_path)
    src = SourceConfig(path=str(pq_path), columns={"query_id": "qid", "channel": "engine", "product_id": "sku", "rank": "position"})
    line = ingest_retrieval_logs(ctx, src)
    assert "3 rows read, 1 loaded, 2 quarantined" in line and "product_id listed at 2 ranks" in line
    assert "rank 3" not in line


def test_missing_required_column_fails_loudly(ctx, tmp_path):
    from annomine.sources import SourceSchemaError

    path = tmp_path / "logs.csv"
    pd.DataFrame({"query_id": ["q1"], "channel": ["bm25"], "product_id": ["p1"]}).to_csv(path, index=False)
    with pytest.raises(SourceSchemaError, match="'rank'"):
        ingest_retrieval_logs(ctx, SourceConfig(path=str(path)))
