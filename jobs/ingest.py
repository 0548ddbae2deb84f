"""Stage `ingest`: products, queries and human labels from files into bronze Delta tables.

Bad rows go to the `quarantine` table with a reason; the job prints how many rows went where (with
`mode: replace`, the default, how many rows of earlier loads it removed; with `append`, how many it
kept) and fails loudly, before any table is written, when a configured file does not exist or has no
rows (`IngestInputError`) or lacks a required column (`SourceSchemaError`).

The synthetic demo shop (`demo_shop`) is generated only into its own folder (`demo_shop.folder`,
default data/demo): a configured file that is missing there is generated; one anywhere else is an
error. Ingest never writes a file a user points at.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import functions as F

from annomine.bounds import bounded
from annomine import ingestion
from annomine.demo_shop import DEMO_FILES, write_demo_shop
from annomine.errors import AnnomineError
from annomine.runtime import JobContext, job_parser, load, open_context, setup_logging
from annomine.sources import SourceConfig, read_raw, select_mapped

log = logging.getLogger("annomine.ingest")


class IngestInputError(AnnomineError):
    """A configured input ingest cannot use: a path that does not exist, or a file without rows."""


LOAD_MODES = ("replace", "append")


@dataclass
class DemoShopConfig:
    """Generate the synthetic shop into `folder` (the demo's own) for configured files missing there."""

    folder: str = "data/demo"
    n_products: int = bounded(3000, ge=1)
    n_queries: int = bounded(400, ge=1)
    n_labelled: int = bounded(120, ge=1)
    seed: int = 7

    def validate(self) -> None:
        if not self.folder.strip():
            raise ValueError("folder must name the demo shop's own folder, e.g. data/demo")


@dataclass
class IngestConfig:
    products: SourceConfig | None = None
    queries: SourceConfig | None = None
    labels: SourceConfig | None = None
    # Origin recorded for the queries file: 'labelled' (a judged set), 'log' (traffic) or 'built'.
    queries_origin: str = "labelled"
    demo_shop: DemoShopConfig | None = None
    # Extra sources appended by later stages' needs (users' own retrieval logs).
    retrieval_logs: SourceConfig | None = None
    # What a load does to the rows earlier loads left in products, queries and human_labels: `replace` (the
    # table then holds exactly the file's rows, as after pointing at a new export; the query log channels
    # builds is kept) or `append` (the file's rows are merged in by key and the others stay).
    mode: str = "replace"

    def validate(self) -> None:
        if self.queries_origin not in ("labelled", "log", "built"):
            raise ValueError(f"queries_origin must be labelled, log or built, got {self.queries_origin!r}")
        if self.mode not in LOAD_MODES:
            raise ValueError(f"mode must be one of {list(LOAD_MODES)}, got {self.mode!r}")


CONFIG_CLASS = IngestConfig


def crowdflower_sources(folder: str) -> dict[str, SourceConfig]:
    """The layout of ../shared/data/crowdflower: products.tsv, queries.tsv, labels.tsv."""
    root = Path(folder)
    return {name: SourceConfig(path=str(root / f"{name}.tsv"), format="tsv") for name in ("products", "queries", "labels")}


def _report(table: str, read: int, loaded: int, quarantined: int, reasons: list) -> str:
    merged = read - loaded - quarantined
    line = f"{table}: {read} rows read, {loaded} loaded, {quarantined} quarantined"
    if merged:
        line += f", {merged} duplicate rows merged"
    if reasons:
        line += " (" + "; ".join(f"{r['reason']}: {r['count']}" for r in reasons) + ")"
    return line


# Rows of a table that another stage writes: a load in `replace` mode keeps them. SQL text, made a Column when
# used: a classic driver cannot build a Column before its SparkContext exists (spark-submit imports this first).
NOT_INGESTED = {"queries": "coalesce(origin = 'built', false)"}  # channels' query log


def _earlier_rows(ctx: JobContext, table: str, good):
    """(rows earlier loads left whose key this load lacks, rows another stage wrote); None when no table yet."""
    if not ctx.tables.exists(table):
        return None
    key = list(ctx.tables.spec(table).key)
    absent = ctx.tables.read(table).join(good.select(*key).distinct(), key, "left_anti")
    other = F.expr(NOT_INGESTED.get(table, "false"))
    return absent.filter(~other), absent.filter(other)


def _write(ctx: JobContext, table: str, good, mode: str) -> str:
    """Load `good` into `table` in `mode`; what happened to the rows earlier loads left, for the report."""
    earlier = _earlier_rows(ctx, table, good)
    if earlier is None:
        ctx.tables.merge(table, good)
        return ""
    ingested, other = earlier
    n_earlier = ingested.count()
    if mode == "append":
        ctx.tables.merge(table, good)
        return f"; append: {n_earlier} rows of earlier loads kept"
    key = list(ctx.tables.spec(table).key)
    kept = ctx.tables.conform(table, other)
    ctx.tables.overwrite(table, kept.unionByName(ctx.tables.conform(table, good).dropDuplicates(key)))
    return f"; replace: {n_earlier} rows of earlier loads removed"


def _load(ctx: JobContext, table: str, good, quarantined, read_count: int, path: str, mode: str) -> str:
    """Write the quarantined rows, then the good ones in `mode`; an error naming the file when no row was good
    (the table is left as it was)."""
    ctx.tables.merge("quarantine", quarantined)
    loaded = good.count()
    # ties broken by the reason: the report reads the same on every engine and every run
    reasons = quarantined.groupBy("reason").count().orderBy(F.desc("count"), "reason").collect()
    report = _report(table, read_count, loaded, sum(r["count"] for r in reasons), reasons)
    if loaded == 0:
        raise IngestInputError(f"{path}: every row was quarantined, table '{table}' got none ({report}); "
                               f"the rows and reasons are in table '{ctx.tables.qualified_name('quarantine')}' "
                               "(annomine sql quarantine_summary)")
    return report + _write(ctx, table, good, mode)


SOURCE_NAMES = ("products", "queries", "labels", "retrieval_logs")


def _configured(cfg: IngestConfig) -> dict[str, SourceConfig]:
    return {name: getattr(cfg, name) for name in SOURCE_NAMES if getattr(cfg, name) is not None}


def _is_local(source: SourceConfig) -> bool:
    return "://" not in source.path


def demo_files_to_generate(cfg: IngestConfig) -> tuple[str, ...]:
    """The demo shop's files to write: configured, missing, and exactly the demo's own file in its folder."""
    if cfg.demo_shop is None:
        return ()
    folder = Path(cfg.demo_shop.folder).expanduser().resolve()
    wanted = []
    for name, source in _configured(cfg).items():
        if name in DEMO_FILES and _is_local(source):
            path = Path(source.path).expanduser().resolve()
            if path == folder / f"{name}.tsv" and not path.exists():
                wanted.append(name)
    return tuple(wanted)


def check_paths_exist(cfg: IngestConfig) -> None:
    """Every configured local path exists; else an error naming the config key."""
    for name, source in _configured(cfg).items():
        if _is_local(source) and not Path(source.path).expanduser().exists():
            hint = ""
            if cfg.demo_shop is not None:
                hint = f" (demo_shop generates its {'/'.join(f'{n}.tsv' for n in DEMO_FILES)} only into {cfg.demo_shop.folder}/)"
            raise IngestInputError(f"ingest.{name}.path: {source.path} does not exist{hint}")


def _read(ctx: JobContext, name: str, source: SourceConfig, required: list[str], optional: list[str]):
    """(mapped string columns, row count); a file without rows is an error naming it."""
    raw = read_raw(ctx.spark, source)
    if not raw.columns or raw.limit(1).count() == 0:
        raise IngestInputError(f"ingest.{name}.path: {source.path} has no rows (empty, or a header only)")
    mapped = select_mapped(ingestion.as_text_columns(raw), source, required, optional)
    return mapped, mapped.count()


def _known_ids(ctx: JobContext, table: str, column: str):
    if ctx.tables.exists(table):
        return ctx.tables.read(table).select(column)
    return ctx.spark.createDataFrame([], f"{column} string")


# Per file: (required, optional) columns in annomine's names.
COLUMNS = {
    "products": (["product_id", "title"], ["description", "brand", "category", "attributes"]),
    "queries": (["query_id", "query"], ["frequency"]),
    "labels": (["query_id", "product_id", "grade"], ["variance"]),
}


def run(ctx: JobContext, cfg: IngestConfig) -> list[str]:
    demo_files = demo_files_to_generate(cfg)
    if demo_files:
        demo = cfg.demo_shop
        log.info("generating the synthetic demo shop (%s) into %s", ", ".join(demo_files), demo.folder)
        write_demo_shop(demo.folder, demo.n_products, demo.n_queries, demo.n_labelled, seed=demo.seed, files=demo_files)
    check_paths_exist(cfg)
    # Every file is read (and checked for rows and columns) before any table is written.
    inputs = {name: _read(ctx, name, getattr(cfg, name), *columns) for name, columns in COLUMNS.items() if getattr(cfg, name)}
    lines = []
    if "products" in inputs:
        mapped, n = inputs["products"]
        good, bad = ingestion.validate_products(mapped, cfg.products.path)
        lines.append(_load(ctx, "products", good, bad, n, cfg.products.path, cfg.mode))
    if "queries" in inputs:
        mapped, n = inputs["queries"]
        good, bad = ingestion.validate_queries(mapped, cfg.queries.path, cfg.queries_origin, ctx.project.segments)
        lines.append(_load(ctx, "queries", good, bad, n, cfg.queries.path, cfg.mode))
    if "labels" in inputs:
        mapped, n = inputs["labels"]
        good, bad = ingestion.validate_labels(mapped, cfg.labels.path, ctx.project.min_grade, ctx.project.max_grade,
                                              _known_ids(ctx, "queries", "query_id"), _known_ids(ctx, "products", "product_id"))
        lines.append(_load(ctx, "human_labels", good, bad, n, cfg.labels.path, cfg.mode))
    if cfg.retrieval_logs:
        from jobs.ingest_logs import ingest_retrieval_logs  # noqa: PLC0415 - optional path

        lines.append(ingest_retrieval_logs(ctx, cfg.retrieval_logs))
    for line in lines:
        print(line)
    return lines


def outcome(lines: list[str]) -> str:
    """The pipeline's one-line account of a run: rows loaded per table ('products 2,999, queries 400, ...')."""
    loaded = [re.match(r"(\w+): \d+ rows read, (\d+) loaded", line) for line in lines]
    return ", ".join(f"{m.group(1)} {int(m.group(2)):,}" for m in loaded if m) + " rows loaded"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = job_parser("annomine ingest", __doc__)
    parser.add_argument("--products", help="products file (overrides the config)")
    parser.add_argument("--queries", help="queries file (overrides the config)")
    parser.add_argument("--labels", help="human labels file (overrides the config)")
    parser.add_argument("--crowdflower", metavar="DIR", help="a folder in the CrowdFlower layout (products/queries/labels.tsv)")
    args = parser.parse_args(argv)
    project, cfg = load(args, "ingest", IngestConfig)
    if args.crowdflower:
        sources = crowdflower_sources(args.crowdflower)
        cfg.products, cfg.queries, cfg.labels, cfg.demo_shop = sources["products"], sources["queries"], sources["labels"], None
    for name in ("products", "queries", "labels"):
        path = getattr(args, name)
        if path:
            setattr(cfg, name, SourceConfig(path=path))
    ctx = open_context(project)
    run(ctx, cfg)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine ingest", main))
