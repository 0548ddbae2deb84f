"""Stage `ingest`: products, queries and human labels from files into bronze Delta tables.

Bad rows go to the `quarantine` table with a reason; the job prints how many rows went where and
fails loudly only when a file lacks a required column.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import functions as F

from annomine import ingestion
from annomine.demo_shop import write_demo_shop
from annomine.runtime import JobContext, job_parser, load, open_context, setup_logging
from annomine.sources import SourceConfig, read_raw, select_mapped

log = logging.getLogger("annomine.ingest")


@dataclass
class DemoShopConfig:
    """Generate the synthetic shop into the configured source paths when they are missing."""

    n_products: int = 3000
    n_queries: int = 400
    n_labelled: int = 120
    seed: int = 7


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
    head_share: float = 0.5
    torso_share: float = 0.8
    notes: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.queries_origin not in ("labelled", "log", "built"):
            raise ValueError(f"queries_origin must be labelled, log or built, got {self.queries_origin!r}")


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


def _load(ctx: JobContext, table: str, good, quarantined, read_count: int) -> str:
    ctx.tables.merge(table, good)
    ctx.tables.merge("quarantine", quarantined)
    loaded = good.count()
    reasons = quarantined.groupBy("reason").count().orderBy(F.desc("count")).collect()
    return _report(table, read_count, loaded, sum(r["count"] for r in reasons), reasons)


def run(ctx: JobContext, cfg: IngestConfig) -> list[str]:
    if cfg.demo_shop and cfg.products and not Path(cfg.products.path).exists():
        folder = Path(cfg.products.path).parent
        log.info("generating the synthetic demo shop into %s", folder)
        write_demo_shop(folder, cfg.demo_shop.n_products, cfg.demo_shop.n_queries, cfg.demo_shop.n_labelled, seed=cfg.demo_shop.seed)
    lines = []
    if cfg.products:
        raw = read_raw(ctx.spark, cfg.products)
        mapped = select_mapped(raw, cfg.products, ["product_id", "title"], ["description", "brand", "category", "attributes"])
        good, bad = ingestion.validate_products(mapped, cfg.products.path)
        lines.append(_load(ctx, "products", good, bad, mapped.count()))
    if cfg.queries:
        raw = read_raw(ctx.spark, cfg.queries)
        mapped = select_mapped(raw, cfg.queries, ["query_id", "query"], ["frequency"])
        good, bad = ingestion.validate_queries(mapped, cfg.queries.path, cfg.queries_origin)
        lines.append(_load(ctx, "queries", good, bad, mapped.count()))
    if cfg.labels:
        raw = read_raw(ctx.spark, cfg.labels)
        mapped = select_mapped(raw, cfg.labels, ["query_id", "product_id", "grade"], ["variance"])
        good, bad = ingestion.validate_labels(mapped, cfg.labels.path, ctx.project.min_grade, ctx.project.max_grade)
        lines.append(_load(ctx, "human_labels", good, bad, mapped.count()))
    if cfg.retrieval_logs:
        from jobs.ingest_logs import ingest_retrieval_logs  # noqa: PLC0415 - optional path

        lines.append(ingest_retrieval_logs(ctx, cfg.retrieval_logs))
    for line in lines:
        print(line)
    return lines


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
    sys.exit(main())
