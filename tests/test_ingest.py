import json
from pathlib import Path

import deltalake
import pytest

from annomine.sources import SourceConfig, SourceSchemaError
from jobs.ingest import IngestConfig, run
from tests.conftest import write_tsv

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "crowdflower"


def _reasons(tables):
    return sorted((r.target_table, r.reason) for r in tables.read("quarantine").collect())


def test_good_and_bad_products_queries_labels(ctx, tables, tmp_path):
    products = write_tsv(tmp_path / "products.tsv", ["product_id", "title", "description"], [
        ["p1", "Red Accent Pillow", "<p>Soft &amp; red</p>"],
        ["p2", "Home dÃ©cor wine rack", ""],            # mojibake: repaired, loaded
        ["", "No id here", "x"],                          # missing id
        ["p3", "   ", "empty title"],                     # empty title
        ["p4", "Bad \ufffd title", ""],                    # bad encoding
        ["p5", "Lamp", "one"], ["p5", "Lamp", "two"],     # duplicate id, different content
        ["p1", "Red Accent Pillow", "<p>Soft &amp; red</p>"],  # exact duplicate: merged
    ])
    queries = write_tsv(tmp_path / "queries.tsv", ["query_id", "query", "frequency"], [
        ["q1", "red pillow", "100"], ["q2", "wine rack", "5"], ["q3", "", "1"], ["q4", "lamp", "many"],
    ])
    labels = write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade", "variance"], [
        ["q1", "p1", "4", "0.0"], ["q2", "p2", "3", "0.4"], ["q2", "p2", "4", "0.0"], ["q1", "p9", "7", "0"], ["q1", "", "2", "0"],
    ])
    lines = run(ctx, IngestConfig(products=SourceConfig(str(products)), queries=SourceConfig(str(queries)),
                                  labels=SourceConfig(str(labels))))
    assert lines[0].startswith("products: 8 rows read, 2 loaded, 5 quarantined")
    got = {r.product_id: r for r in tables.read("products").collect()}
    assert set(got) == {"p1", "p2"}
    assert got["p2"].title == "Home décor wine rack"
    assert got["p1"].text == "Red Accent Pillow | Soft & red"
    assert _reasons(tables) == sorted([
        ("products", "missing product_id"), ("products", "empty title"), ("products", "title: bad encoding: character U+FFFD"),
        ("products", "duplicate product_id with different content (2 versions)"),
        ("products", "duplicate product_id with different content (2 versions)"),
        ("queries", "empty query"), ("queries", "frequency is not a non-negative integer"),
        ("human_labels", "grade outside 1..4"), ("human_labels", "missing product_id"),
    ])
    raw = [json.loads(r.raw) for r in tables.read("quarantine").collect() if r.reason == "empty title"][0]
    assert raw["product_id"] == "p3"
    labels_got = {(r.query_id, r.product_id): (r.grade, r.variance) for r in tables.read("human_labels").collect()}
    assert labels_got == {("q1", "p1"): (4, 0.0), ("q2", "p2"): (4, 0.45)}  # mean 3.5 rounds up; var 0.2 + 0.25
    segments = {r.query_id: r.segment for r in tables.read("queries").collect()}
    assert segments == {"q1": "head", "q2": "tail"}

    # A re-run loads and quarantines nothing twice.
    run(ctx, IngestConfig(products=SourceConfig(str(products)), queries=SourceConfig(str(queries)), labels=SourceConfig(str(labels))))
    assert tables.read("products").count() == 2 and tables.read("quarantine").count() == 9


def test_column_mapping_parquet_and_attributes(ctx, tables, tmp_path):
    import pandas as pd

    path = tmp_path / "catalog.parquet"
    pd.DataFrame({"sku": ["a1", "a2"], "name": ["Blue Mug", "Green Mug"], "color": ["blue", "green"], "size": ["12 oz", "16 oz"]}).to_parquet(path)
    source = SourceConfig(str(path), columns={"product_id": "sku", "title": "name"}, attribute_columns=["color", "size"])
    run(ctx, IngestConfig(products=source))
    got = {r.product_id: r for r in tables.read("products").collect()}
    assert got["a1"].attributes == "color: blue; size: 12 oz"
    assert got["a2"].text == "Green Mug | color: green; size: 16 oz"


def test_wrong_file_schema_fails_loudly_naming_file_and_column(ctx, tmp_path):
    path = write_tsv(tmp_path / "products.tsv", ["id", "name"], [["1", "x"]])
    with pytest.raises(SourceSchemaError, match=r"products.tsv: required column 'product_id'"):
        run(ctx, IngestConfig(products=SourceConfig(str(path))))


def test_demo_shop_is_generated_and_ingested(ctx, tables, tmp_path):
    from jobs.ingest import DemoShopConfig

    folder = tmp_path / "demo"
    cfg = IngestConfig(products=SourceConfig(str(folder / "products.tsv")), queries=SourceConfig(str(folder / "queries.tsv")),
                       labels=SourceConfig(str(folder / "labels.tsv")), queries_origin="log",
                       demo_shop=DemoShopConfig(n_products=300, n_queries=60, n_labelled=10))
    lines = run(ctx, cfg)
    assert lines[0].startswith("products: 304 rows read, 299 loaded, 5 quarantined")  # 3 bad rows + both conflicting copies
    segments = {r.segment for r in tables.read("queries").collect()}
    assert segments == {"head", "torso", "tail"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/crowdflower is not checked out")
def test_crowdflower_loads_with_right_counts(ctx, tables, spark):
    from jobs.ingest import crowdflower_sources

    sources = crowdflower_sources(str(SHARED))
    run(ctx, IngestConfig(products=sources["products"], queries=sources["queries"]))
    assert deltalake.DeltaTable(str(tables.location("products"))).to_pyarrow_table().num_rows == 9913
    assert spark.sql(f"SELECT count(*) AS n FROM {tables.qualified_name('queries')}").collect()[0]["n"] == 145
