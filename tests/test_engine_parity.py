"""Classic JVM Spark computes what the embedded engine computes.

The same job code runs on Sail (this process: Spark Connect, Delta tables) and on classic local PySpark
(a JVM in a worker process, tests/engine_worker.py: `project.engine: local_jvm`, `table_format: parquet`,
since no Delta jar is available offline), from the same inputs: ingest validation (bad rows, merges,
a re-run), mining (every class; quotas and the seeded random negatives) and the curriculum (every
variant: tables, dev set, shards in their exact row order, manifests). Every output table is compared
row for row (sorted; the timestamps a job stamps with the current time left out), as pandas frames.
Floating-point columns may differ in the last bits (a sum's order follows the engine's partitions), so
they are compared to 1e-12 relative; everything else is compared exactly.

The JVM worker starts once for this module (about 25-60 s, most of it the JVM) and stops at its end.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from annomine.config import ConfigError, ProjectConfig
from annomine.runtime import JobContext
from annomine.tables import TableStore
from tests.conftest import write_tsv
from tests.engine_worker import JvmEngine

HERE = "tests.test_engine_parity"
# stamped with the current time by the jobs: they differ between any two runs
VOLATILE = {"ingested_at", "quarantined_at", "mined_at"}


def _java() -> bool:
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def jvm():
    if not _java():
        pytest.skip("no Java runtime: classic PySpark needs a JVM (Java 17); CI images have one")
    engine = JvmEngine.start(nice=10)
    yield engine
    engine.stop()


# ---- what runs on both engines ---------------------------------------------------------------------
def _dump(ctx: JobContext, out: Path, names: list[str], prefix: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        df = ctx.tables.read(name)
        df.drop(*[c for c in df.columns if c in VOLATILE]).toPandas().to_parquet(out / f"{prefix}{name}.parquet")


def case_ingest(ctx: JobContext, folder: str, out: str) -> dict:
    """The bad-rows fixture of tests/test_ingest.py, loaded twice (the second run replaces the first's rows)."""
    from annomine.sources import SourceConfig
    from jobs.ingest import IngestConfig, run

    cfg = IngestConfig(products=SourceConfig(f"{folder}/products.tsv"), queries=SourceConfig(f"{folder}/queries.tsv"),
                       labels=SourceConfig(f"{folder}/labels.tsv"))
    first, second = run(ctx, cfg), run(ctx, cfg)
    _dump(ctx, Path(out), ["products", "queries", "human_labels", "quarantine"])
    return {"first": first, "second": second, "versions": {t: ctx.tables.version(t) for t in ("products", "quarantine")}}


def _mine_world(ctx: JobContext, products: dict, queries: list, logs: list) -> None:
    from pyspark.sql import functions as F

    from annomine.schemas import TABLES

    spark, now = ctx.spark, F.current_timestamp()
    ctx.tables.overwrite("products", spark.createDataFrame(list(products.items()), "product_id string, text string").select(
        "product_id", F.col("text").alias("title"), F.lit("").alias("description"), F.lit(None).cast("string").alias("brand"),
        F.lit(None).cast("string").alias("category"), F.lit(None).cast("string").alias("attributes"), "text",
        F.sha2("text", 256).alias("content_hash"), F.lit("test").alias("source"), now.alias("ingested_at")))
    ctx.tables.overwrite("queries", spark.createDataFrame(queries, "query_id string, query string, segment string").select(
        "query_id", "query", F.lit(1).cast("long").alias("frequency"), "segment", F.lit("labelled").alias("origin"),
        F.lit("test").alias("source"), now.alias("ingested_at")))
    ctx.tables.overwrite("retrieval_logs", spark.createDataFrame(logs, TABLES["retrieval_logs"].schema))


def case_mine(ctx: JobContext, out: str) -> dict:
    """tests/test_mining.py's logs with open rules (every class), then its caps world with quotas, caps and
    the seeded random walk over the product pool."""
    from jobs import mine
    from tests import test_mining as tm

    stats = {}
    _mine_world(ctx, tm.PRODUCTS, tm.QUERIES, tm.LOGS + [tm.log("r1", "q1", "sparse", "pA", 1)])
    s = mine.run(ctx, mine.MineConfig(**tm.OPEN, log_mlflow=False))
    stats["open"] = {k: s[k] for k in ("n_candidates", "n_queries", "n_quarantined_log_rows")}
    _dump(ctx, Path(out), ["mined_candidates", "mined_report", "quarantine"], "open_")

    caps = JobContext(replace(ctx.project, schema=ctx.project.schema + "_caps"), ctx.spark, None)
    caps.tables = TableStore(ctx.spark, caps.project)
    logs = [tm.log("r1", "q1", "ann", f"n{i:02d}", 1 + i // 2, query="alpha") for i in range(12)]
    logs += [tm.log("r1", "q1", "lexical", f"h{i:02d}", 1 + i, query="alpha") for i in range(6)]
    logs += [tm.log("r1", "q2", "bm25", f"n{i:02d}", 1 + i, query="item thing") for i in range(0, 12, 3)]
    products = {**{f"n{i:02d}": f"item {i}" for i in range(12)}, **{f"h{i:02d}": f"thing {i}" for i in range(6)},
                **{f"r{i:02d}": f"filler {i}" for i in range(40)}}
    _mine_world(caps, products, [("q1", "alpha", "torso"), ("q2", "item thing", "head")], logs)
    cfg = mine.MineConfig(max_positives=4, max_negatives=8, random_pool_size=30, log_mlflow=False, seed=5,
                          class_quotas={"hard_negative": 3, "token_similar_negative": 3, "random_negative": 2})
    s = mine.run(caps, cfg)
    stats["caps"] = {k: s[k] for k in ("n_candidates", "n_queries", "n_quarantined_log_rows")}
    _dump(caps, Path(out), ["mined_candidates", "mined_report"], "caps_")
    return stats


def case_curriculum(ctx: JobContext, out: str) -> dict:
    """tests/test_curriculum.py's world through `annomine curriculum`, every variant, caps that bind."""
    from jobs.curriculum import CurriculumConfig, run
    from tests.test_curriculum import EVERY_VARIANT, build_world, every_stage

    build_world(ctx, n_queries=16)
    cfg = CurriculumConfig(variants=EVERY_VARIANT, num_files=2, row_group_size=4, dev_pool_size=5,
                           stages=every_stage(CurriculumConfig().stages))
    for stage in cfg.stages:
        if stage.source != "human":
            stage.max_examples = 6
    summary = run(ctx, cfg)
    out = Path(out)
    _dump(ctx, out, [f"train_set_{v}" for v in cfg.variants])
    root = ctx.project.warehouse_path / "shards"
    for name in ("dev_eval.parquet", "dev_pool.parquet"):
        shutil.copy(root / name, out / name)
    shards = []  # every shard file's rows, in file and row order: what the trainer reads
    for path in sorted(root.glob("*/run-*/stage*/part-*.parquet")):
        rows = pd.read_parquet(path)
        rows.insert(0, "_file", str(path.relative_to(root)).replace(f"{path.parent.parent.name}/", ""))
        rows.insert(1, "_row", np.arange(len(rows)))
        shards.append(rows)
    pd.concat(shards, ignore_index=True).to_parquet(out / "shards.parquet")
    summary["shards_dir"] = None  # the only path in it
    for manifest in summary["variants"].values():  # a run's folder name is its own
        run = manifest.pop("run")
        manifest["stages"] = [dict(e, folder=e["folder"].removeprefix(f"{run}/")) for e in manifest["stages"]]
    return summary


# ---- the comparisons -------------------------------------------------------------------------------
def _plain(value):
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Arrays as lists, NaN as None, rows sorted by their values (floats rounded for the sort only)."""
    df = df.apply(lambda col: col.map(_plain)) if len(df) else df
    key = df.apply(lambda r: json.dumps([round(v, 9) if isinstance(v, float) else v for v in r], default=str), axis=1) \
        if len(df) else pd.Series([], dtype=str)
    return df.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def assert_same_rows(sail: Path, jvm: Path, name: str, ordered: bool = False, rtol: float = 1e-12, atol: float = 0.0,
                     engines: tuple[str, str] = ("Sail", "the JVM")) -> int:
    """The same rows in table file `name` under both folders (in any order unless `ordered`), floats within
    `rtol`/`atol`; the number of rows."""
    a, b = pd.read_parquet(sail / name), pd.read_parquet(jvm / name)
    assert list(a.columns) == list(b.columns), name
    assert len(a) == len(b), f"{name}: {len(a)} rows on {engines[0]}, {len(b)} on {engines[1]}"
    if not ordered:
        a, b = _canonical(a), _canonical(b)
    for col in a.columns:
        left, right = a[col].map(_plain).tolist(), b[col].map(_plain).tolist()
        if all(isinstance(v, float) or v is None for v in left + right) and any(isinstance(v, float) for v in left):
            np.testing.assert_allclose(np.array(right, dtype=float), np.array(left, dtype=float), rtol=rtol, atol=atol,
                                       equal_nan=True, err_msg=f"{name}.{col}")
        else:
            assert left == right, f"{name}.{col}: first difference at row " \
                f"{next(i for i, (x, y) in enumerate(zip(left, right)) if x != y)}"
    return len(a)


def _run_both(case: str, spark, jvm: JvmEngine, tmp_path: Path, **kwargs) -> tuple[dict, dict, Path, Path]:
    """Run `case` on Sail here and on the JVM in the worker, each in its own warehouse (same schema name)."""
    results, outs = {}, {}
    for engine in ("sail", "jvm"):
        project = ProjectConfig(name="parity", warehouse=str(tmp_path / engine / "warehouse"), schema=f"parity_{case}",
                                mlflow_experiment="annomine-parity")
        outs[engine] = tmp_path / engine / "out"
        if engine == "sail":
            tables = TableStore(spark, project)
            tables.register_all()
            results[engine] = globals()[f"case_{case}"](JobContext(project, spark, tables), out=str(outs[engine]), **kwargs)
            results[engine] = json.loads(json.dumps(results[engine], default=str))
        else:
            fields = {"name": project.name, "warehouse": project.warehouse, "schema": project.schema,
                      "mlflow_experiment": project.mlflow_experiment}
            results[engine] = jvm.call(f"{HERE}:case_{case}", fields, out=str(outs[engine]), **kwargs)
    return results["sail"], results["jvm"], outs["sail"], outs["jvm"]


def test_ingest_validation_is_the_same_on_the_jvm(spark, jvm, tmp_path):
    folder = tmp_path / "input"
    write_tsv(folder / "products.tsv", ["product_id", "title", "description"], [
        ["p1", "Red Accent Pillow", "<p>Soft &amp; red</p>"], ["p2", "Home dÃ©cor wine rack", ""], ["", "No id here", "x"],
        ["p3", "   ", "empty title"], ["p4", "Bad \ufffd title", ""], ["p5", "Lamp", "one"], ["p5", "Lamp", "two"],
        ["p1", "Red Accent Pillow", "<p>Soft &amp; red</p>"], ["p6", "Caf\u00e9  Table\tOak", "  <b>solid</b> oak "]])
    write_tsv(folder / "queries.tsv", ["query_id", "query", "frequency"], [
        ["q1", "red pillow", "100"], ["q2", "wine rack", "5"], ["q3", "", "1"], ["q4", "lamp", "many"], ["q5", "oak table", "40"]])
    write_tsv(folder / "labels.tsv", ["query_id", "product_id", "grade", "variance"], [
        ["q1", "p1", "4", "0.0"], ["q2", "p2", "3", "0.4"], ["q2", "p2", "4", "0.0"], ["q1", "p9", "7", "0"], ["q1", "", "2", "0"],
        ["q5", "p6", "2", "0.1"], ["q5", "p6", "3", "0.3"], ["q5", "p6", "3", "0.2"]])
    sail, jvm_result, out_s, out_j = _run_both("ingest", spark, jvm, tmp_path, folder=str(folder))
    assert sail["first"][0].startswith("products: 9 rows read, 3 loaded, 5 quarantined")  # the fixture bites
    assert jvm_result == sail
    counts = {n: assert_same_rows(out_s, out_j, f"{n}.parquet") for n in ("products", "queries", "human_labels", "quarantine")}
    assert counts == {"products": 3, "queries": 3, "human_labels": 3, "quarantine": 9}


def test_mining_is_the_same_on_the_jvm(spark, jvm, tmp_path):
    sail, jvm_result, out_s, out_j = _run_both("mine", spark, jvm, tmp_path)
    assert jvm_result == sail
    for name in ("open_mined_candidates", "open_mined_report", "open_quarantine", "caps_mined_candidates", "caps_mined_report"):
        assert assert_same_rows(out_s, out_j, f"{name}.parquet") > 0, name
    classes = set(pd.read_parquet(out_s / "open_mined_candidates.parquet")["candidate_class"])
    assert len(classes) == 5  # every class is compared, random negatives included
    caps = pd.read_parquet(out_s / "caps_mined_candidates.parquet")
    assert (caps["candidate_class"] == "random_negative").sum() >= 2


def test_curriculum_is_the_same_on_the_jvm(spark, jvm, tmp_path):
    from tests.test_curriculum import EVERY_VARIANT

    sail, jvm_result, out_s, out_j = _run_both("curriculum", spark, jvm, tmp_path)
    assert jvm_result == sail  # manifests: stages, rows, files, composition, source table versions, counts
    for v in EVERY_VARIANT:
        assert assert_same_rows(out_s, out_j, f"train_set_{v}.parquet") > 0, v
    assert assert_same_rows(out_s, out_j, "dev_eval.parquet") > 0
    assert assert_same_rows(out_s, out_j, "dev_pool.parquet") > 0
    assert assert_same_rows(out_s, out_j, "shards.parquet", ordered=True) > 0  # the trainer's exact row order


def test_the_engine_settings_are_typed_and_validated(tmp_path):
    from annomine.config import load_project_config

    conf = tmp_path / "c.yaml"
    conf.write_text("project: {engine: local_jvm, table_format: parquet, spark_master: 'local[3]'}\n")
    project = load_project_config(conf)
    assert (project.engine, project.table_format, project.spark_master) == ("local_jvm", "parquet", "local[3]")
    for bad, message in [("engine: jvm", r"engine: must be one of \['auto', 'local_jvm'\]"),
                         ("table_format: orc", r"table_format: must be one of \['delta', 'parquet'\]"),
                         ("{table_format: parquet, catalog: main}", "cannot be combined with catalog"),
                         ("{engine: local_jvm}", "needs the Delta jars"),
                         ("{engine: local_jvm, table_format: parquet, spark_master: 'yarn'}", "spark_master must be local"),
                         ("{engine: local_jvm, table_format: parquet, spark_remote: 'sc://x:1'}", "spark_remote must be empty")]:
        conf.write_text(f"project: {bad if bad.startswith('{') else '{' + bad + '}'}\n")
        with pytest.raises(ConfigError, match=message):
            load_project_config(conf)
    # a Spark Connect process refuses to start a JVM session instead of mixing the two flavours
    from annomine import spark as sessions

    with pytest.raises(ConfigError, match="ANNOMINE_SPARK_MODE=classic"):
        sessions._start_local_jvm(replace(project, table_format="parquet"))


def test_parquet_tables_merge_like_delta_on_sail(spark, tmp_path):
    """The Parquet format's MERGE emulation against Delta's real MERGE, both on Sail: update, keep, insert,
    update_if, and the version counter."""
    rows = [("p1", "a", "", None, None, None, "a", "h1", "s", dt.datetime(2026, 1, 1)),
            ("p2", "b", "", None, None, None, "b", "h2", "s", dt.datetime(2026, 1, 1))]
    later = [("p2", "B", "", None, None, None, "B", "h3", "s", dt.datetime(2026, 1, 2)),
             ("p3", "c", "", None, None, None, "c", "h4", "s", dt.datetime(2026, 1, 2))]
    got = {}
    for fmt in ("delta", "parquet"):
        project = ProjectConfig(warehouse=str(tmp_path / fmt), schema=f"merge_{fmt}", table_format=fmt)
        tables = TableStore(spark, project)
        schema = tables.spec("products").schema
        tables.merge("products", spark.createDataFrame(rows, schema))
        tables.merge("products", spark.createDataFrame(later, schema), update_if="s.ingested_at > t.ingested_at")
        tables.merge("products", spark.createDataFrame([later[0][:1] + ("X",) + later[0][2:]], schema), update=False)
        got[fmt] = (sorted((r.product_id, r.title) for r in tables.read("products").collect()), tables.version("products"),
                    spark.sql(f"SELECT count(*) AS n FROM {tables.qualified_name('products')}").collect()[0]["n"])
    assert got["parquet"] == got["delta"] == ([("p1", "a"), ("p2", "B"), ("p3", "c")], 2, 3)  # a MERGE that changes nothing commits nothing
