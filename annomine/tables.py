"""Logical tables: names, locations, schema checks and idempotent writes.

Embedded (no `project.catalog`): each table is a Delta folder `<warehouse>/<schema>/<table>`,
registered at start-up as `<schema>.<table>` (Sail's catalog lives in memory). On Unity Catalog
(`project.catalog` set): tables are `<catalog>.<schema>.<table>`. With `project.table_format: parquet`
(a JVM Spark without the Delta jars) a table folder holds versioned Parquet (annomine.parquet_tables)
and MERGE, append and delete are emulated by rewriting the table as its next version.

Writes are idempotent: a whole-table overwrite, or a SQL MERGE on the table's key. Dynamic
partition overwrite is never used (Sail ignores it and overwrites everything). Every write is
preceded by an explicit schema check, because Sail does not enforce Delta schemas.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import types as T

from annomine import parquet_tables
from annomine.config import ProjectConfig
from annomine.errors import DamagedInputError, MissingInputError
from annomine.schemas import TABLES, TableSpec

log = logging.getLogger(__name__)
# What a MERGE that lost a race with a concurrent writer says; each is safe to retry (MERGE is idempotent).
_LOST_COMMIT_RACE = re.compile(r"Failed to commit transaction|Concurrent\w*Exception|Missing commit file")


class SchemaMismatchError(ValueError):
    """A DataFrame does not match the schema of the table it is written to."""


def _type_str(dt: T.DataType) -> str:
    return dt.simpleString()


def check_schema(actual: T.StructType, expected: T.StructType, table: str) -> None:
    """Raise SchemaMismatchError naming every missing, extra or mistyped column."""
    have = {f.name: f.dataType for f in actual.fields}
    want = {f.name: f.dataType for f in expected.fields}
    problems = []
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing:
        problems.append(f"missing column(s) {missing}")
    if extra:
        problems.append(f"unexpected column(s) {extra}")
    for name, dtype in want.items():
        if name in have and _type_str(have[name]) != _type_str(dtype):
            problems.append(f"column '{name}' is {_type_str(have[name])}, expected {_type_str(dtype)}")
    if problems:
        raise SchemaMismatchError(f"refusing to write table '{table}': " + "; ".join(problems))


# The table stores this process opened, by warehouse schema folder: where to look when the engine fails to read.
_OPEN_STORES: dict[str, "TableStore"] = {}


def damaged_table_error(exc: BaseException) -> DamagedInputError | None:
    """When the engine error `exc` comes from a damaged table of an opened store (a data file deleted or
    truncated), the error naming the table and the file; else None."""
    from pyspark.errors import PySparkException

    if not isinstance(exc, PySparkException):
        return None
    for store in reversed(list(_OPEN_STORES.values())):
        problem = store.damage()
        if problem:
            return DamagedInputError(problem)
    return None


class TableStore:
    """Reads and writes annomine's logical tables on the current engine."""

    def __init__(self, spark, project: ProjectConfig):
        self.spark = spark
        self.project = project
        self.unity_catalog = bool(project.catalog)
        self.format = project.table_format  # 'delta' or 'parquet' (folders only: ProjectConfig.validate)
        self.parquet = self.format == "parquet" and not self.unity_catalog
        if not self.unity_catalog and not self.parquet:
            folder = str(project.warehouse_path / project.schema)
            _OPEN_STORES.pop(folder, None)
            _OPEN_STORES[folder] = self  # the latest opened is looked at first

    # ---- names and locations -------------------------------------------------------------
    def spec(self, name: str) -> TableSpec:
        if name not in TABLES:
            raise KeyError(f"unknown table '{name}'; known: {sorted(TABLES)}")
        return TABLES[name]

    def qualified_name(self, name: str) -> str:
        if self.unity_catalog:
            return f"{self.project.catalog}.{self.project.schema}.{name}"
        return f"{self.project.schema}.{name}"

    def location(self, name: str) -> Path:
        """Folder of a table (no catalog): Delta, or versioned Parquet."""
        return self.project.warehouse_path / self.project.schema / name

    def exists(self, name: str) -> bool:
        if self.unity_catalog:
            return bool(self.spark.catalog.tableExists(self.qualified_name(name)))
        if self.parquet:
            return parquet_tables.exists(self.location(name))
        return (self.location(name) / "_delta_log").is_dir()

    def register_all(self) -> list[str]:
        """Register every existing table by location (Sail's catalog is in memory)."""
        if self.unity_catalog:
            self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.project.catalog}.{self.project.schema}")
            return []
        self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.project.schema}")
        registered = []
        for name in TABLES:
            if self.exists(name):
                self._register(name)
                registered.append(name)
        return registered

    def _register(self, name: str) -> None:
        if self.unity_catalog:
            return
        self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.project.schema}")
        if self.parquet:
            # every version is its own folder: point the catalog entry at the current one (an external
            # table: dropping the entry leaves the files)
            self.spark.sql(f"DROP TABLE IF EXISTS {self.qualified_name(name)}")
            self.spark.sql(f"CREATE TABLE {self.qualified_name(name)} ({parquet_tables.ddl(self.spec(name).schema)}) "
                           f"USING parquet LOCATION '{parquet_tables.data_path(self.location(name))}'")
            return
        self.spark.sql(
            f"CREATE TABLE IF NOT EXISTS {self.qualified_name(name)} USING delta LOCATION '{self.location(name)}'"
        )

    # ---- reads ---------------------------------------------------------------------------
    def read(self, name: str) -> DataFrame:
        if not self.exists(name):
            raise MissingInputError(
                f"table '{name}' does not exist yet ({self.qualified_name(name)}); run the job that writes it: "
                f"{self.spec(name).written_by}"
            )
        if self.unity_catalog:
            return self.spark.table(self.qualified_name(name))
        if self.parquet:
            return parquet_tables.read(self.spark, self.location(name), self.spec(name).schema)
        return self.spark.read.format("delta").load(str(self.location(name)))

    def damage(self) -> str | None:
        """The first Delta table folder with a data file gone or truncated, as one line naming both; else None."""
        from annomine.table_damage import delta_file_problem

        for name in TABLES:
            if not self.exists(name):
                continue
            problem = delta_file_problem(self.location(name))
            if problem:
                return (f"table '{name}' ({self.location(name)}): {problem}; restore the table folder from a copy, or "
                        f"remove it and run the job that writes it again: {self.spec(name).written_by}")
        return None

    def version(self, name: str) -> int | None:
        """Current version of a table (Delta's, or the Parquet pointer's), or None when it does not exist."""
        if not self.exists(name):
            return None
        if self.parquet:
            return parquet_tables.version(self.location(name))
        if self.unity_catalog:
            row = self.spark.sql(f"DESCRIBE HISTORY {self.qualified_name(name)} LIMIT 1").collect()[0]
            return int(row["version"])
        from deltalake import DeltaTable

        return int(DeltaTable(str(self.location(name))).version())

    # ---- writes --------------------------------------------------------------------------
    def conform(self, name: str, df: DataFrame) -> DataFrame:
        """Check `df` against the table schema and order its columns like the table."""
        spec = self.spec(name)
        check_schema(df.schema, spec.schema, name)
        return df.select(*spec.columns)

    def empty(self, name: str) -> DataFrame:
        return self.spark.createDataFrame([], self.spec(name).schema)

    def overwrite(self, name: str, df: DataFrame) -> None:
        """Replace the whole table with `df` (idempotent)."""
        df = self.conform(name, df)
        if self.parquet:
            parquet_tables.write(df, self.location(name))
            self._register(name)
        elif self.unity_catalog:
            df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").saveAsTable(self.qualified_name(name))
        else:
            df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(str(self.location(name)))
            self._register(name)

    def append(self, name: str, df: DataFrame) -> None:
        """Add rows to the table (created when missing); the caller keeps the key unique."""
        self.ensure(name)
        df = self.conform(name, df)
        if self.parquet:
            self.overwrite(name, self.read(name).unionByName(df))
        elif self.unity_catalog:
            df.write.format("delta").mode("append").saveAsTable(self.qualified_name(name))
        else:
            df.write.format("delta").mode("append").save(str(self.location(name)))

    def delete_where(self, name: str, condition: str) -> None:
        """Delete the rows for which the SQL `condition` holds (the table is created when missing)."""
        self.ensure(name)
        if self.parquet:
            self.overwrite(name, self.read(name).where(f"NOT coalesce(({condition}), false)"))
        else:
            self.spark.sql(f"DELETE FROM {self.qualified_name(name)} WHERE {condition}").collect()

    def ensure(self, name: str) -> None:
        """Create the table empty when it does not exist."""
        if not self.exists(name):
            self.overwrite(name, self.empty(name))
        else:
            self._register(name)

    def merge(self, name: str, df: DataFrame, *, update: bool = True, update_if: str | None = None,
              max_tries: int = 6) -> None:
        """SQL MERGE of `df` into the table on its key: update matches (or keep them), insert the rest.

        Source rows are de-duplicated on the key first, so a re-run never duplicates rows.
        `update_if` (SQL over `t.` and `s.`) limits the update to the matches it holds for. A commit
        that loses a race with another writer (`Failed to commit transaction`, Delta's
        `Concurrent...Exception`), or whose read of the log catches another writer mid-commit (Sail's
        `Missing commit file: expected version 0, found 8`, seen once in CI with three writers), is
        retried with backoff: the MERGE is idempotent.
        """
        spec = self.spec(name)
        df = self.conform(name, df).dropDuplicates(list(spec.key))
        self.ensure(name)
        if self.parquet:
            merged, changes = self._merged(name, df, update, update_if)
            if changes.limit(1).count():  # like a Delta MERGE on Sail: nothing to change, no new version
                self.overwrite(name, merged)
            return
        view = f"annomine_src_{name}_{uuid.uuid4().hex[:8]}"
        df.createOrReplaceTempView(view)
        condition = " AND ".join(f"t.{k} <=> s.{k}" for k in spec.key)
        matched = f"WHEN MATCHED{f' AND ({update_if})' if update_if else ''} THEN UPDATE SET *" if update else ""
        sql = (f"MERGE INTO {self.qualified_name(name)} t USING {view} s ON {condition} "
               f"{matched} WHEN NOT MATCHED THEN INSERT *")
        try:
            for attempt in range(max_tries):
                try:
                    self.spark.sql(sql).collect()
                    break
                except Exception as exc:  # noqa: BLE001 - only a lost commit race is retried
                    lost_race = _LOST_COMMIT_RACE.search(str(exc))
                    if attempt + 1 == max_tries or not lost_race:
                        raise
                    delay = min(10.0, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)
                    log.warning("MERGE into %s lost a commit race (%s); retry %d in %.2fs", name,
                                str(exc).splitlines()[0][:120], attempt + 1, delay)
                    time.sleep(delay)
        finally:
            self.spark.catalog.dropTempView(view)

    def _merged(self, name: str, source: DataFrame, update: bool, update_if: str | None) -> tuple[DataFrame, DataFrame]:
        """What MERGE would leave in the table, as a DataFrame (the Parquet format's MERGE): target rows
        without a match, matches (the source row where the update applies, else the target row), and
        source rows without a match; and the keys MERGE would update or insert."""
        from pyspark.sql import functions as F

        spec = self.spec(name)
        t, s = self.read(name).alias("t"), source.alias("s")
        on = F.expr(" AND ".join(f"t.{k} <=> s.{k}" for k in spec.key))
        take_source = F.expr(f"({update_if})") if update and update_if else F.lit(bool(update))
        pairs = t.join(s, on, "inner")
        matched = pairs.select(*[
            F.when(take_source, F.col(f"s.{c}")).otherwise(F.col(f"t.{c}")).alias(c) for c in spec.columns])
        kept = t.join(s, on, "left_anti").select(*spec.columns)
        inserted = s.join(t, F.expr(" AND ".join(f"s.{k} <=> t.{k}" for k in spec.key)), "left_anti").select(*spec.columns)
        keys = [F.col(f"s.{k}").alias(k) for k in spec.key]
        changes = pairs.where(F.coalesce(take_source, F.lit(False))).select(*keys).unionByName(inserted.select(*spec.key))
        return kept.unionByName(matched).unionByName(inserted), changes
