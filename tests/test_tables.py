import pytest
from pyspark.sql import types as T

from annomine.schemas import TABLES, parse_schema
from annomine.tables import SchemaMismatchError


def test_parse_schema_handles_nested_types():
    schema = parse_schema("a string, b array<float>, c map<string,int>, d bigint")
    assert [f.name for f in schema.fields] == ["a", "b", "c", "d"]
    assert isinstance(schema["b"].dataType, T.ArrayType)
    assert isinstance(schema["c"].dataType, T.MapType)


def test_every_table_key_is_a_column():
    for spec in TABLES.values():
        assert set(spec.key) <= set(spec.columns), spec.name


def test_wrong_schema_is_refused_before_writing(tables, spark):
    bad = spark.createDataFrame([("p1", "Title", 3)], "product_id string, title string, price int")
    with pytest.raises(SchemaMismatchError) as err:
        tables.overwrite("products", bad)
    message = str(err.value)
    assert "missing column(s)" in message and "description" in message and "unexpected column(s) ['price']" in message
    assert not tables.exists("products")


def test_mistyped_column_is_named(tables, spark):
    rows = spark.createDataFrame([("q", "p", "4", 0.0, "s", None)],
                                 "query_id string, product_id string, grade string, variance double, source string, ingested_at timestamp")
    with pytest.raises(SchemaMismatchError, match="column 'grade' is string, expected int"):
        tables.merge("human_labels", rows)


def test_merge_is_idempotent_and_updates_on_key(tables, spark):
    schema = tables.spec("human_labels").schema
    first = spark.createDataFrame([("q1", "p1", 4, 0.0, "a", None), ("q1", "p2", 1, 0.0, "a", None)], schema)
    tables.merge("human_labels", first)
    tables.merge("human_labels", first)
    assert tables.read("human_labels").count() == 2
    changed = spark.createDataFrame([("q1", "p2", 2, 0.5, "b", None), ("q2", "p1", 3, 0.0, "b", None)], schema)
    tables.merge("human_labels", changed)
    rows = {(r.query_id, r.product_id): r.grade for r in tables.read("human_labels").collect()}
    assert rows == {("q1", "p1"): 4, ("q1", "p2"): 2, ("q2", "p1"): 3}
    assert tables.version("human_labels") >= 3
    # SQL over the registered table name works as users will query it.
    n = spark.sql(f"SELECT count(*) AS n FROM {tables.qualified_name('human_labels')}").collect()[0]["n"]
    assert n == 3


def test_insert_only_merge_keeps_existing_rows(tables, spark):
    schema = tables.spec("human_labels").schema
    tables.merge("human_labels", spark.createDataFrame([("q1", "p1", 4, 0.0, "a", None)], schema))
    tables.merge("human_labels", spark.createDataFrame([("q1", "p1", 1, 0.0, "b", None)], schema), update=False)
    assert [r.grade for r in tables.read("human_labels").collect()] == [4]


class _SparkWhoseFirstMergeFails:
    """The real session, except that the first MERGE raises `message` (what a lost commit race says)."""

    def __init__(self, spark, message):
        self._spark, self._message, self.merges = spark, message, 0

    def __getattr__(self, name):
        return getattr(self._spark, name)

    def sql(self, query, *args, **kwargs):
        if query.startswith("MERGE"):
            self.merges += 1
            if self.merges == 1:
                raise RuntimeError(self._message)
        return self._spark.sql(query, *args, **kwargs)


@pytest.mark.parametrize("message", ["Failed to commit transaction: 0",
                                     "Missing commit file: expected version 0, found 8",
                                     "io.delta.exceptions.ConcurrentAppendException: Files were added"])
def test_a_merge_that_lost_a_commit_race_is_retried(tables, spark, monkeypatch, message):
    if tables.parquet:
        pytest.skip("the Parquet format rewrites the table; it has no MERGE to lose")
    flaky = _SparkWhoseFirstMergeFails(spark, message)
    monkeypatch.setattr(tables, "spark", flaky)
    tables.merge("human_labels", spark.createDataFrame([("q1", "p1", 4, 0.0, "a", None)], tables.spec("human_labels").schema))
    assert flaky.merges == 2
    assert [r.grade for r in tables.read("human_labels").collect()] == [4]


def test_a_merge_that_fails_otherwise_is_not_retried(tables, spark, monkeypatch):
    if tables.parquet:
        pytest.skip("the Parquet format rewrites the table; it has no MERGE to fail")
    flaky = _SparkWhoseFirstMergeFails(spark, "Table or view not found: nowhere")
    monkeypatch.setattr(tables, "spark", flaky)
    with pytest.raises(RuntimeError, match="not found"):
        tables.merge("human_labels", spark.createDataFrame([("q1", "p1", 4, 0.0, "a", None)], tables.spec("human_labels").schema))
    assert flaky.merges == 1
