"""Stage `mine`: set logic over the three retrieval channels into five difficulty levels.

Reads `retrieval_logs`, `products` and `queries`; writes `mined_candidates` (one row per (query,
product) candidate: rank metadata, class, level 1-5) and `mined_report` (counts per class, per
channel, per segment); prints the report and logs it, the rules and a PNG chart to MLflow.
Invalid log rows go to `quarantine`. Both tables are rewritten whole, so a re-run is idempotent.
The logic lives in `annomine.mining` (pure DataFrame transforms); this module only does I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import functions as F

from annomine import mining
from annomine.publish import remove_unreferenced, run_folder
from annomine.runtime import JobContext, run_job
from annomine.tracking import Tracker

log = logging.getLogger("annomine.mine")


@dataclass
class MineConfig(mining.MiningRules):
    """Mining rules (see `annomine.mining.MiningRules`) plus what to read and where to report."""

    # Mine these retrieval_logs runs; empty: the latest run of each channel.
    run_ids: list[str] = field(default_factory=list)
    # Sampling seed; null: project.seed.
    seed: int | None = None
    write_report_table: bool = True
    log_mlflow: bool = True

    def rules(self, project_seed: int) -> mining.MiningRules:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(mining.MiningRules)}
        values["seed"] = project_seed if self.seed is None else self.seed
        return mining.MiningRules(**values)


CONFIG_CLASS = MineConfig


def parquet_checkpoint(spark, folder: Path):
    """A `checkpoint(df, name)` for `mining.mine_candidates`: write Parquet once, read it back."""
    def checkpoint(df, name: str):
        path = str(folder / name)
        df.write.mode("overwrite").parquet(path)
        # An empty result may leave no file to infer a schema from: read with the known one.
        return spark.read.schema(df.schema).parquet(path)

    return checkpoint


SCRATCH_PREFIX = "mine-"


@contextlib.contextmanager
def scratch_folder(ctx: JobContext) -> Iterator[Path | None]:
    """A new `<warehouse>/_scratch/mine-<tag>` for the run's checkpoints (None on Unity Catalog), removed after it;
    the folders of killed runs are removed first (those of a live concurrent run are held by its lock)."""
    if ctx.tables.unity_catalog:
        yield None
        return
    parent = ctx.project.warehouse_path / "_scratch"
    remove_unreferenced(parent, SCRATCH_PREFIX, lambda: [])
    with run_folder(parent, SCRATCH_PREFIX) as scratch:
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    remove_unreferenced(parent, SCRATCH_PREFIX, lambda: [])  # this run's lock file


def _track(ctx: JobContext, cfg: MineConfig, rules: mining.MiningRules, rows: list[dict], stats: dict) -> str | None:
    params = {k: (",".join(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(rules).items()
              if k != "class_quotas"}
    params.update({f"quota_{k}": v for k, v in rules.class_quotas.items()})
    params["run_ids"] = ",".join(cfg.run_ids) or "latest"
    with Tracker(ctx.project, cfg.log_mlflow).run("mine", params) as run, tempfile.TemporaryDirectory() as tmp:
        metrics = {f"n_{r['candidate_class']}": r["n_candidates"] for r in rows if r["dimension"] == "class"}
        run.metrics({**metrics, **stats})
        chart = mining.report_chart(rows, str(Path(tmp) / "mining_report.png"),
                                    title=f"mined candidates ({stats['n_candidates']:,} for {stats['n_queries']:,} queries)")
        run.artifacts([chart])
        run.text(mining.format_report(rows), "mining_report.txt")
    return run.run_id


def run(ctx: JobContext, cfg: MineConfig) -> dict:
    rules = cfg.rules(ctx.project.seed)
    started = time.time()
    logs = ctx.tables.read("retrieval_logs")
    good, bad = mining.split_logs(logs)
    n_bad = bad.count()
    if n_bad:
        ctx.tables.merge("quarantine", mining.quarantine_rows(bad))
        log.warning("%d retrieval_logs row(s) quarantined (see the quarantine table, target_table='mined_candidates')", n_bad)
    products = ctx.tables.read("products")
    n_products = products.count()
    queries = ctx.tables.read("queries")
    log.info("mining %s runs over a catalog of %d products", ",".join(cfg.run_ids) or "the latest", n_products)
    with scratch_folder(ctx) as scratch:
        checkpoint = parquet_checkpoint(ctx.spark, scratch) if scratch is not None else None
        mined = mining.mine_candidates(good, products, queries, rules, n_products=n_products,
                                       run_ids=cfg.run_ids or None, checkpoint=checkpoint)
        ctx.tables.overwrite("mined_candidates", mined)

    written = ctx.tables.read("mined_candidates")
    report = mining.mining_report(written).withColumn("mined_at", F.current_timestamp())
    rows = [r.asDict() for r in report.collect()]
    totals = written.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("query_id").alias("q")).collect()[0]
    stats = {"n_candidates": int(totals["n"]), "n_queries": int(totals["q"]), "n_quarantined_log_rows": int(n_bad),
             "seconds": round(time.time() - started, 1)}
    if cfg.write_report_table:
        ctx.tables.overwrite("mined_report", report)
    log.debug("%s", mining.format_report(rows))
    by_class = ", ".join(f"{r['candidate_class']} {r['n_candidates']:,}" for r in sorted(rows, key=lambda r: r["level"] or 0)
                         if r["dimension"] == "class")
    print(f"mined_candidates: {stats['n_candidates']:,} candidates for {stats['n_queries']:,} queries "
          f"in {stats['seconds']}s ({n_bad} log rows quarantined): {by_class}; by channel and segment: "
          + ("table mined_report" if cfg.write_report_table else "`annomine sql` over mined_candidates"))
    missing = [c for c in mining.CLASSES if not any(r["dimension"] == "class" and r["candidate_class"] == c for r in rows)]
    if missing:
        print(f"warning: no candidates of class(es) {missing}; check the thresholds in the mine: section")
    stats["mlflow_run_id"] = _track(ctx, cfg, rules, rows, stats)
    stats["report"] = rows
    return stats


def outcome(stats: dict) -> str:
    """The pipeline's one-line account of a run."""
    return f"{stats['n_candidates']:,} candidates for {stats['n_queries']:,} queries"


def main(argv: list[str] | None = None) -> int:
    return run_job("mine", __doc__, MineConfig, run, argv)


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine mine", main))
