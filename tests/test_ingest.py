import json
from pathlib import Path

import deltalake
import pytest

from annomine.errors import AnnomineError
from annomine.sources import SourceConfig, SourceSchemaError
from jobs.ingest import DemoShopConfig, IngestConfig, IngestInputError, run
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
        ("queries", "empty query"), ("queries", "bad value 'many' in column frequency (expected an integer 0..9223372036854775807)"),
        ("human_labels", "bad value '7' in column grade (expected an integer 1..4)"), ("human_labels", "missing product_id"),
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


def _demo_cfg(folder, demo: DemoShopConfig | None) -> IngestConfig:
    return IngestConfig(products=SourceConfig(f"{folder}/products.tsv"), queries=SourceConfig(f"{folder}/queries.tsv"),
                        labels=SourceConfig(f"{folder}/labels.tsv"), queries_origin="log", demo_shop=demo)


def test_demo_shop_is_generated_into_its_own_folder_on_a_fresh_clone(ctx, tables, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # conf/local.yaml's relative paths, on a checkout without data/demo
    lines = run(ctx, _demo_cfg("data/demo", DemoShopConfig(n_products=300, n_queries=60, n_labelled=10)))
    assert sorted(p.name for p in (tmp_path / "data" / "demo").iterdir()) == ["labels.tsv", "products.tsv", "queries.tsv"]
    assert lines[0].startswith("products: 304 rows read, 299 loaded, 5 quarantined")  # 3 bad rows + both conflicting copies
    assert "human_labels" in lines[2] and " 0 quarantined" in lines[2]  # no demo label points at a quarantined product
    segments = {r.segment for r in tables.read("queries").collect()}
    assert segments == {"head", "torso", "tail"}


def test_demo_shop_never_writes_where_a_user_path_points(ctx, tables, tmp_path):
    # Issue 14.3: a mistyped products path next to the user's own queries.tsv.
    mine = write_tsv(tmp_path / "mine" / "queries.tsv", ["query_id", "query"], [["u1", "my own query"]])
    before = mine.read_bytes()
    cfg = _demo_cfg(tmp_path / "mine", DemoShopConfig(folder=str(tmp_path / "demo"), n_products=30, n_queries=5, n_labelled=2))
    with pytest.raises(IngestInputError, match=r"^ingest\.products\.path: .*/mine/products\.tsv does not exist"):
        run(ctx, cfg)
    assert mine.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["queries.tsv"]
    assert not (tmp_path / "demo").exists() and not tables.exists("queries")  # nothing generated, nothing loaded


def test_demo_shop_writes_only_its_missing_files(ctx, tables, tmp_path):
    folder = tmp_path / "demo"
    own = write_tsv(folder / "queries.tsv", ["query_id", "query"], [["0", "my edited demo query"]])
    before = own.read_bytes()
    cfg = _demo_cfg(folder, DemoShopConfig(folder=str(folder), n_products=30, n_queries=5, n_labelled=2))
    cfg.labels = SourceConfig(str(folder / "my_labels.tsv"))  # not a file the demo makes: never generated
    with pytest.raises(IngestInputError, match=r"ingest\.labels\.path: .*my_labels\.tsv does not exist"):
        run(ctx, cfg)
    assert own.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["products.tsv", "queries.tsv"]


def test_missing_path_without_demo_names_the_config_key(ctx, tmp_path):
    with pytest.raises(IngestInputError, match=r"^ingest\.queries\.path: /x/y\.tsv does not exist$") as err:
        run(ctx, IngestConfig(queries=SourceConfig("/x/y.tsv")))
    assert isinstance(err.value, AnnomineError)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/crowdflower is not checked out")
def test_crowdflower_loads_with_right_counts(ctx, tables, spark):
    from jobs.ingest import crowdflower_sources

    sources = crowdflower_sources(str(SHARED))
    run(ctx, IngestConfig(products=sources["products"], queries=sources["queries"]))
    assert deltalake.DeltaTable(str(tables.location("products"))).to_pyarrow_table().num_rows == 9913
    assert spark.sql(f"SELECT count(*) AS n FROM {tables.qualified_name('queries')}").collect()[0]["n"] == 145


def _quarantined(tables, target):
    return {r.reason for r in tables.read("quarantine").collect() if r.target_table == target}


def _catalog(tmp_path, ids=("p1", "p2")):
    return SourceConfig(str(write_tsv(tmp_path / "products.tsv", ["product_id", "title"], [[i, f"Item {i}"] for i in ids])))


def _query_file(tmp_path, ids=("q1", "q2")):
    return SourceConfig(str(write_tsv(tmp_path / "queries.tsv", ["query_id", "query"], [[i, f"query {i}"] for i in ids])))


def test_bad_grade_and_variance_are_quarantined_not_fatal(ctx, tables, tmp_path):
    labels = write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade", "variance"], [
        ["q1", "p1", "abc", "0"], ["q1", "p2", "2.5", "0"], ["q2", "p1", "4", "abc"], ["q2", "p2", "NaN", "0"],
        ["q2", "p2", "3", "-1"], ["q1", "p1", "4.0", ""],
    ])
    run(ctx, IngestConfig(products=_catalog(tmp_path), queries=_query_file(tmp_path), labels=SourceConfig(str(labels))))
    assert _quarantined(tables, "human_labels") == {
        "bad value 'abc' in column grade (expected an integer 1..4)",
        "bad value '2.5' in column grade (expected an integer 1..4)",
        "bad value 'NaN' in column grade (expected an integer 1..4)",
        "bad value 'abc' in column variance (expected a number >= 0)",
        "bad value '-1' in column variance (expected a number >= 0)",
    }
    assert [(r.query_id, r.product_id, r.grade, r.variance) for r in tables.read("human_labels").collect()] == [("q1", "p1", 4, 0.0)]


def test_frequency_too_large_for_bigint_is_quarantined_not_fatal(ctx, tables, tmp_path):
    queries = write_tsv(tmp_path / "queries.tsv", ["query_id", "query", "frequency"], [
        ["q1", "lamp", "99999999999999999999999"], ["q2", "mug", "9223372036854775807"], ["q3", "rug", "-3"], ["q4", "pen", ""],
    ])
    run(ctx, IngestConfig(queries=SourceConfig(str(queries))))
    assert _quarantined(tables, "queries") == {
        "bad value '99999999999999999999999' in column frequency (expected an integer 0..9223372036854775807)",
        "bad value '-3' in column frequency (expected an integer 0..9223372036854775807)",
    }
    assert {r.query_id: r.frequency for r in tables.read("queries").collect()} == {"q2": 9223372036854775807, "q4": None}


def test_nan_null_none_and_blank_ids_are_missing_ids(ctx, tables, tmp_path):
    products = write_tsv(tmp_path / "products.tsv", ["product_id", "title"],
                         [["p1", "Lamp"], ["NaN", "Mug"], [" null ", "Rug"], ["None", "Pen"], ["NULL", "Cup"], ["  ", "Hat"]])
    queries = write_tsv(tmp_path / "queries.tsv", ["query_id", "query"], [["q1", "lamp"], ["nan", "mug"], ["Null", "rug"]])
    labels = write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade"], [["q1", "p1", "4"], ["none", "p1", "3"], ["q1", "NaN", "3"]])
    run(ctx, IngestConfig(products=SourceConfig(str(products)), queries=SourceConfig(str(queries)), labels=SourceConfig(str(labels))))
    assert [r.product_id for r in tables.read("products").collect()] == ["p1"]
    assert [r.query_id for r in tables.read("queries").collect()] == ["q1"]
    assert sorted((r.target_table, r.reason) for r in tables.read("quarantine").collect()) == sorted(
        [("products", "missing product_id")] * 5 + [("queries", "missing query_id")] * 2
        + [("human_labels", "missing query_id"), ("human_labels", "missing product_id")])


def test_ids_keep_their_text_form_from_parquet(ctx, tables, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"product_id": pa.array([1.0, 2.0, float("nan")]), "title": ["Lamp", "Mug", "Rug"]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"query_id": pa.array([10, 11], pa.int64()), "query": ["lamp", "mug"]}), tmp_path / "q.parquet")
    pq.write_table(pa.table({"query_id": pa.array([10.0]), "product_id": pa.array([2.0]), "grade": pa.array([3.0])}), tmp_path / "l.parquet")
    labels = write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade"], [["10", "1", "4"], ["11", "2", "2"]])
    run(ctx, IngestConfig(products=SourceConfig(str(tmp_path / "p.parquet")), queries=SourceConfig(str(tmp_path / "q.parquet")),
                          labels=SourceConfig(str(labels))))
    run(ctx, IngestConfig(labels=SourceConfig(str(tmp_path / "l.parquet")), mode="append"))  # more labels
    assert sorted(r.product_id for r in tables.read("products").collect()) == ["1", "2"]
    assert sorted(r.query_id for r in tables.read("queries").collect()) == ["10", "11"]
    assert sorted((r.query_id, r.product_id, r.grade) for r in tables.read("human_labels").collect()) == [
        ("10", "1", 4), ("10", "2", 3), ("11", "2", 2)]
    assert _reasons(tables) == [("products", "missing product_id")]  # the NaN id


def test_labels_for_unknown_products_or_queries_are_quarantined(ctx, tables, tmp_path):
    labels = write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade"],
                       [["q1", "p1", "4"], ["q1", "p9", "3"], ["q7", "p2", "2"], ["q7", "p9", "1"]])
    run(ctx, IngestConfig(products=_catalog(tmp_path), queries=_query_file(tmp_path), labels=SourceConfig(str(labels))))
    assert _quarantined(tables, "human_labels") == {"unknown product_id 'p9'", "unknown query_id 'q7'"}
    assert [(r.query_id, r.product_id) for r in tables.read("human_labels").collect()] == [("q1", "p1")]


@pytest.mark.parametrize("content", ["product_id\ttitle\n", ""], ids=["header_only", "empty_file"])
def test_an_input_without_rows_is_an_error_naming_the_file(ctx, tables, tmp_path, content):
    queries = write_tsv(tmp_path / "queries.tsv", ["query_id", "query"], [["q1", "lamp"]])
    (tmp_path / "products.tsv").write_text(content, encoding="utf-8")
    cfg = IngestConfig(queries=SourceConfig(str(queries)), products=SourceConfig(str(tmp_path / "products.tsv")))
    with pytest.raises(IngestInputError, match=r"^ingest\.products\.path: .*products\.tsv has no rows"):
        run(ctx, cfg)
    assert not tables.exists("queries")  # checked before anything is written


def test_every_input_row_either_loads_or_is_quarantined(ctx, tables, tmp_path):
    """Loses nothing: each row of each file is in its table (by key) or in quarantine (by its raw row), never both."""
    import csv

    files = {
        "products": write_tsv(tmp_path / "products.tsv", ["product_id", "title", "description"], [
            ["p1", "Lamp", "a"], ["p1", "Lamp", "a"], ["p2", "Mug", ""], ["nan", "Rug", ""], ["p3", "", "x"],
            ["p4", "Pen", "one"], ["p4", "Pen", "two"], ["p5", "Bad \ufffd", ""], ["1.0", "Cup", ""]]),
        "queries": write_tsv(tmp_path / "queries.tsv", ["query_id", "query", "frequency"], [
            ["q1", "lamp", "3"], ["q2", "mug", "99999999999999999999999"], ["q3", "cup", "x"], ["null", "rug", "1"], ["q4", "pen", ""]]),
        "labels": write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade", "variance"], [
            ["q1", "p1", "4", "0"], ["q1", "p1", "3", "0"], ["q1", "p2", "abc", "0"], ["q1", "p9", "2", "0"],
            ["q9", "p1", "2", "0"], ["q1", "p4", "2", "0"], ["q4", "p2", "5", "0"], ["q4", "1.0", "1", "NaN"]]),
    }
    run(ctx, IngestConfig(**{name: SourceConfig(str(path)) for name, path in files.items()}))
    quarantine = tables.read("quarantine").collect()
    for name, table, key in [("products", "products", ["product_id"]), ("queries", "queries", ["query_id"]),
                             ("labels", "human_labels", ["query_id", "product_id"])]:
        with open(files[name], newline="", encoding="utf-8") as fh:
            rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh, delimiter="\t")]
        loaded = {tuple(r[k] for k in key) for r in tables.read(table).collect()}
        refused = [json.loads(q.raw) for q in quarantine if q.target_table == table]
        for row in rows:
            assert (tuple(row.get(k) for k in key) in loaded) != (row in refused), (name, row)
        assert len(refused) == sum(row in refused for row in rows) == len(rows) - sum(tuple(row.get(k) for k in key) in loaded for row in rows)
    assert len(quarantine) == 5 + 3 + 6


def _labels_file(tmp_path, rows):
    return SourceConfig(str(write_tsv(tmp_path / "labels.tsv", ["query_id", "product_id", "grade"], rows)))


def test_reingesting_a_smaller_export_replaces_the_earlier_rows_and_says_so(ctx, tables, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run(ctx, IngestConfig(products=_catalog(first, ("p1", "p2", "p3")), queries=_query_file(first, ("q1", "q2")),
                          labels=_labels_file(first, [["q1", "p1", "4"], ["q2", "p3", "1"]])))
    built = ctx.spark.createDataFrame([("b-1", "built query", None, None, "built", "channels", None)],
                                      tables.spec("queries").schema)
    tables.merge("queries", built)  # the query log channels builds: not ingest's to remove

    lines = run(ctx, IngestConfig(products=_catalog(second, ("p1", "p9")), queries=_query_file(second, ("q1",)),
                                  labels=_labels_file(second, [["q1", "p9", "3"]])))
    assert lines == ["products: 2 rows read, 2 loaded, 0 quarantined; replace: 2 rows of earlier loads removed",
                     "queries: 1 rows read, 1 loaded, 0 quarantined; replace: 1 rows of earlier loads removed",
                     "human_labels: 1 rows read, 1 loaded, 0 quarantined; replace: 2 rows of earlier loads removed"]
    assert sorted(r.product_id for r in tables.read("products").collect()) == ["p1", "p9"]
    assert sorted(r.query_id for r in tables.read("queries").collect()) == ["b-1", "q1"]
    assert [(r.query_id, r.product_id, r.grade) for r in tables.read("human_labels").collect()] == [("q1", "p9", 3)]


def test_append_mode_keeps_the_earlier_rows_and_counts_them(ctx, tables, tmp_path):
    run(ctx, IngestConfig(products=_catalog(tmp_path / "first", ("p1", "p2", "p3"))))
    lines = run(ctx, IngestConfig(products=_catalog(tmp_path / "second", ("p1", "p9")), mode="append"))
    assert lines == ["products: 2 rows read, 2 loaded, 0 quarantined; append: 2 rows of earlier loads kept"]
    assert sorted(r.product_id for r in tables.read("products").collect()) == ["p1", "p2", "p3", "p9"]
    with pytest.raises(ValueError, match="mode must be one of"):
        IngestConfig(mode="merge").validate()
