"""Stage `curriculum`: mined candidates + graded annotations -> per-stage training sets.

For every configured model variant (curriculum, mixed, no_llm, curriculum_roar, human,
human_plus_curriculum, curriculum_then_human, curriculum_with_human) it writes the Delta table `train_set_<variant>` and Parquet shards under
a new folder `<shards_dir>/<variant>/run-<tag>/stage<k>_<name>/` with a `manifest.json` (stages, rows, files, schema, source
table versions, composition), then publishes that folder by rewriting `<shards_dir>/<variant>/manifest.json` last
(training.shards): a run killed midway leaves the previous set published, and its folder is removed by the next run. `human` trains on the human labels of the train queries (one MNR stage,
`human_stage`: a top-grade product as positive, a product of the same query graded <= negative_max_grade
as hard negative); `human_plus_curriculum` runs that stage before the curriculum's stages,
`curriculum_then_human` after them, and `curriculum_with_human` mixes its rows into the curriculum's MNR stage.

Labelled queries are split by `annomine.splits`: only `train` queries reach a training set; `dev` and
`test` queries never do. It also writes the dev evaluation set used for model selection during training
(`<shards_dir>/dev_eval.parquet`, `dev_pool.parquet`, and a copy in each variant's run folder): human labels of the dev queries only (never test),
over their judged products plus a sample of other catalog items. Prints each stage's composition (rows by
class, level and grade) and the number of candidates dropped for annotation errors, ambiguous grades or
dev / test queries.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import functions as F

from annomine import curriculum as cur
from annomine.bounds import bounded
from annomine.publish import run_folder, write_atomically
from annomine.runtime import JobContext, run_job
from annomine.splits import DEV_FRACTION, SEED, TEST_FRACTION, split_of
from training.shards import RUN_PREFIX, prune_shards, publish_shards, write_stage_shards

log = logging.getLogger("annomine.curriculum")


def _default_stages() -> list[cur.StageDef]:
    return [
        cur.StageDef("easy", "bce", ["easy_positive"], ["random_negative", "easy_positive"], max_examples=4000, max_per_query=40),
        cur.StageDef("hard", "mnr", ["hard_positive", "hard_negative", "easy_positive"], ["hard_negative", "hard_positive"],
                     max_examples=3000, max_per_query=30),
        cur.StageDef("token_similar", "triplet", list(cur.CLASSES), ["token_similar_negative"], max_examples=2000, max_per_query=20),
    ]


@dataclass
class CurriculumConfig:
    variants: list[str] = field(default_factory=lambda: list(cur.VARIANTS))
    stages: list[cur.StageDef] = field(default_factory=_default_stages)
    mixed_stage: cur.StageDef = field(default_factory=lambda: cur.StageDef(
        "mixed", "mnr", list(cur.CLASSES), list(cur.CLASSES), max_examples=9000, max_per_query=60))
    roar_stage: cur.StageDef = field(default_factory=lambda: cur.StageDef(
        "roar", "roar", list(cur.CLASSES), list(cur.CLASSES), max_examples=2000, max_per_query=20))
    # The human-label stage of the `human` / `human_plus_curriculum` variants (source: human).
    human_stage: cur.StageDef = field(default_factory=lambda: cur.StageDef(
        "human", "mnr", [cur.HUMAN_LABEL], [cur.HUMAN_LABEL], max_examples=5000, max_per_query=64, source="human"))
    # Its positives: human grade >= this (None: the project's top grade); negatives: <= negative_max_grade.
    human_positive_min_grade: int | None = None
    # Graded labels: >= positive_min_grade positive, <= negative_max_grade negative (project grade scale).
    positive_min_grade: int = 3
    negative_max_grade: int = 2
    judge_version: str | None = None
    set_logic_fallback: list[str] = field(default_factory=lambda: ["random_negative"])
    # Items per listwise group: the positive and up to max_group_size - 1 others.
    max_group_size: int = bounded(8, ge=2)
    # Shards: files per stage (a multiple of every worker count you will use) and rows per row group.
    num_files: int = bounded(4, ge=1)
    row_group_size: int = bounded(256, ge=1)
    shards_dir: str | None = None  # default <warehouse>/shards
    dev_fraction: float = DEV_FRACTION
    test_fraction: float = TEST_FRACTION
    dev_seed: int = SEED
    dev_pool_size: int = bounded(1500, ge=1)
    seed: int = 13

    def validate(self) -> None:
        for v in self.variants:
            if v not in cur.VARIANTS:
                raise ValueError(f"variants: unknown variant {v!r}; known: {list(cur.VARIANTS)}")
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        for s in [*self.stages, self.mixed_stage, self.roar_stage, self.human_stage]:
            s.validate()
        for s in [*self.stages, self.mixed_stage, self.roar_stage]:
            if s.source != "mined":
                raise ValueError(f"stage {s.name!r}: only human_stage reads the human labels (source: mined here)")
        if self.human_stage.source != "human":
            raise ValueError("human_stage: source must be 'human'")
        if self.human_positive_min_grade is not None and self.human_positive_min_grade <= self.negative_max_grade:
            raise ValueError("human_positive_min_grade must be above negative_max_grade")
        if not 0 <= self.test_fraction <= self.dev_fraction <= 1:
            raise ValueError("need 0 <= test_fraction <= dev_fraction <= 1")
        if self.negative_max_grade >= self.positive_min_grade:
            raise ValueError("negative_max_grade must be below positive_min_grade")
        for c in self.set_logic_fallback:
            if c not in cur.CLASSES:
                raise ValueError(f"set_logic_fallback: unknown class {c!r}")


CONFIG_CLASS = CurriculumConfig


def shards_root(ctx: JobContext, cfg: CurriculumConfig) -> Path:
    return Path(cfg.shards_dir).expanduser().resolve() if cfg.shards_dir else ctx.project.outputs_path / "shards"


def labelled_splits(ctx: JobContext, cfg: CurriculumConfig) -> dict[str, list[str]]:
    """The human-labelled queries (origin 'labelled', or any query with human labels) by split:
    {'train': [...], 'dev': [...], 'test': [...]}."""
    ids = ctx.tables.read("queries").filter(F.col("origin") == "labelled").select("query_id")
    if ctx.tables.exists("human_labels"):
        ids = ids.unionByName(ctx.tables.read("human_labels").select("query_id"))
    labelled = ids.distinct().toPandas()
    out: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for q in sorted(labelled["query_id"].astype(str)):
        out[split_of(q, cfg.dev_fraction, cfg.dev_seed, cfg.test_fraction, ctx.project.fold, ctx.project.rotation)].append(q)
    return out


def dev_query_ids(ctx: JobContext, cfg: CurriculumConfig) -> list[str]:
    """Dev queries among the human-labelled ones: model selection (never test queries)."""
    return labelled_splits(ctx, cfg)["dev"]


def write_dev_files(folder: Path, dev: tuple | None) -> None:
    """`dev_eval.parquet` and `dev_pool.parquet` of `dev` (labels, pool) into `folder`, each by one rename."""
    if dev is None:
        return
    for name, frame in zip(("dev_eval.parquet", "dev_pool.parquet"), dev):
        write_atomically(folder / name, lambda tmp, frame=frame: frame.to_parquet(tmp, index=False))


def write_dev_eval(ctx: JobContext, cfg: CurriculumConfig, dev_ids: list[str], root: Path) -> tuple[dict, tuple | None]:
    """Human labels of dev queries + a candidate pool (their judged products and a catalog sample), written
    under `root`; (counts, (labels, pool) or None)."""
    if not dev_ids or not ctx.tables.exists("human_labels"):
        return {"queries": 0, "labels": 0, "pool": 0}, None
    labels = (ctx.tables.read("human_labels").filter(F.col("query_id").isin(*dev_ids))
              .join(ctx.tables.read("queries").select("query_id", "query"), "query_id")
              .select("query_id", "query", "product_id", F.col("grade").cast("int").alias("grade")).toPandas())
    judged = set(labels["product_id"])
    products = ctx.tables.read("products").select("product_id", "text")
    judged_ids = sorted(judged)
    others = products.filter(~F.col("product_id").isin(*judged_ids)) if judged_ids else products
    sample = (others.withColumn("_h", F.xxhash64(F.lit(cfg.seed), F.col("product_id"))).orderBy("_h")
              .limit(cfg.dev_pool_size).drop("_h"))
    judged_df = products.filter(F.col("product_id").isin(*judged_ids)) if judged_ids else products.limit(0)
    pool = judged_df.unionByName(sample).toPandas()
    write_dev_files(root, (labels, pool))
    return {"queries": int(labels["query_id"].nunique()), "labels": int(len(labels)), "pool": int(len(pool))}, (labels, pool)


def _level(level) -> str:
    """A difficulty level for printing ('-' for human-label rows, which have none)."""
    return "-" if level is None or level != level else str(int(level))


def _write_stage_sets(variant: str, stages: list, data, seeds: list[int], cfg: CurriculumConfig,
                      run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Each stage's rows of `data` as shards under `run_dir`, their composition printed; (entries, skipped stages)."""
    entries, skipped = [], []
    for k, stage in enumerate(stages, start=1):
        pdf = data[data["stage"] == k].drop(columns=["stage", "stage_name", "loss"])
        if pdf.empty:
            msg = (f"[{variant}] stage {k} '{stage.name}' has no training rows: check the mined classes "
                   f"{stage.positive_classes} / {stage.negative_classes} and the grade thresholds")
            print(f"WARNING {msg}; the stage is left out of the manifest")
            log.warning(msg)
            skipped.append({"stage": k, "name": stage.name, "loss": stage.loss})
            continue
        folder = f"stage{k}_{stage.name}"
        entry = write_stage_shards(pdf, run_dir / folder, num_files=cfg.num_files,
                                   row_group_size=cfg.row_group_size, seed=seeds[k - 1])
        comp = cur.composition(pdf)
        by_source = cur.rows_by_source(pdf)
        entry.update({"stage": k, "name": stage.name, "loss": stage.loss, "folder": folder, "epochs": stage.epochs, "lr": stage.lr,
                      "source": "+".join(src for src, n in by_source.items() if n) or stage.source, "source_rows": by_source,
                      "composition": comp.astype(object).where(comp.notna(), None).to_dict(orient="records")})
        entries.append(entry)
        print(f"[{variant}] stage {k} {stage.name} ({stage.loss}): {entry['rows']} rows in {len(entry['files'])} files")
        by = comp[comp["side"] == "item"].groupby(["level", "candidate_class", "grade", "label"], dropna=False)["rows"].sum()
        for (level, cls, grade, label), n in by.items():
            print(f"    item L{_level(level):<3} {cls:<24} grade={grade!s:<4} label={label!s:<4} rows={n}")
        neg = comp[comp["side"] == "negative"].groupby(["level", "candidate_class", "grade"], dropna=False)["rows"].sum()
        for (level, cls, grade), n in neg.items():
            print(f"    neg  L{_level(level):<3} {cls:<24} grade={grade!s:<4} rows={n}")
        grades = comp[comp["side"] == "list_item"]
        for _, r in grades.iterrows():
            print(f"    list item grade={r['grade']!s:<4} rows={r['rows']}")
    return entries, skipped


def publish_variant(root: Path, stages: list, data, seeds: list[int], cfg: CurriculumConfig, manifest: dict,
                    dev_frames: tuple | None) -> dict:
    """Write a variant's training rows (`data`, with `stage`) as a new shard set under `root/<variant>` with the dev
    check it is trained with, then publish it (training.shards.publish_shards); the published manifest."""
    variant = manifest["variant"]
    with run_folder(root / variant, RUN_PREFIX) as run_dir:  # a new folder, published by the manifest
        entries, skipped = _write_stage_sets(variant, stages, data, seeds, cfg, run_dir)
        if not entries:
            raise ValueError(f"[{variant}] no stage has training rows; nothing to train "
                             f"(candidates: {manifest.get('candidate_status')})")
        write_dev_files(run_dir, dev_frames)
        return publish_shards(root / variant, run_dir, dict(manifest, stages=entries, skipped_stages=skipped))


def run(ctx: JobContext, cfg: CurriculumConfig) -> dict:
    root = shards_root(ctx, cfg)
    sources = {t: ctx.tables.version(t) for t in ("mined_candidates", "annotations", "products", "queries", "human_labels")}
    mined = ctx.tables.read("mined_candidates")
    products = ctx.tables.read("products")
    annotations = None
    if ctx.tables.exists("annotations"):
        annotations = cur.latest_annotations(ctx.tables.read("annotations"), cfg.judge_version)
    elif any(v not in ("no_llm", *cur.HUMAN_ONLY_VARIANTS) for v in cfg.variants):
        raise FileNotFoundError("table 'annotations' does not exist; run `annomine annotate` or use variants: [no_llm]")
    splits = labelled_splits(ctx, cfg)
    dev_ids, test_ids = splits["dev"], splits["test"]
    print(f"labelled queries: {len(splits['train'])} train, {len(dev_ids)} dev (selection), "
          f"{len(test_ids)} test (reporting only); dev and test queries reach no training set")
    for variant_root in sorted(p for p in root.glob("*") if p.is_dir()):
        prune_shards(variant_root)  # the leftovers of runs killed before they published
    dev, dev_frames = write_dev_eval(ctx, cfg, dev_ids, root)  # the selection pool: dev queries only, never test
    print(f"dev evaluation set: {dev['queries']} queries, {dev['labels']} labels, pool of {dev['pool']} items")
    summary = {"shards_dir": str(root), "dev": dev, "splits": {k: len(v) for k, v in splits.items()}, "variants": {}}
    human_rows = None
    for variant in cfg.variants:
        stages = cur.variant_stages(variant, cfg.stages, cfg.mixed_stage, cfg.roar_stage, cfg.human_stage)
        labelled, counts, human_counts = None, {}, None
        if any(s.source == "mined" for s in stages):
            rules = cur.LabelRules(cfg.positive_min_grade, cfg.negative_max_grade, list(cfg.set_logic_fallback),
                                   use_annotations=variant != "no_llm")
            labelled = cur.label_candidates(mined, annotations, products, dev_ids, rules, test_ids)
            counts = cur.status_counts(labelled)
            print(f"[{variant}] candidates: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            if counts.get(cur.STALE):
                print(f"[{variant}] {counts[cur.STALE]} candidates' grades were given for an earlier query or product "
                      "text and are not used; `annomine annotate` grades them again")
        if any(s.reads("human") for s in stages):
            if human_rows is None:
                if not ctx.tables.exists("human_labels"):
                    raise FileNotFoundError(f"variant {variant!r} needs table 'human_labels'; run `annomine ingest`")
                top = cfg.human_positive_min_grade if cfg.human_positive_min_grade is not None else ctx.project.max_grade
                human_rows = cur.human_label_rows(ctx.tables.read("human_labels"), ctx.tables.read("queries"), products,
                                                  dev_ids, test_ids, top, cfg.negative_max_grade)
            human_counts = cur.status_counts(human_rows)
            print(f"[{variant}] human labels: " + ", ".join(f"{k}={v}" for k, v in sorted(human_counts.items())))
        # A stage's seed is its position among the stages of its source: human_plus_curriculum's mined stages
        # get the rows (and shard order) the curriculum variant's stages get.
        seeds = [cfg.seed + sum(t.source == st.source for t in stages[:i + 1]) for i, st in enumerate(stages)]
        frames = []
        for k, stage in enumerate(stages, start=1):
            source = human_rows if stage.source == "human" else labelled
            rows = cur.stage_rows(source, stage, seeds[k - 1], cfg.max_group_size)
            if stage.blend is not None:  # curriculum_with_human: the human stage's rows (and seed) join this stage's
                rows = rows.unionByName(cur.stage_rows(human_rows, stage.blend, cfg.seed + 1, cfg.max_group_size))
            frames.append(rows.withColumn("stage", F.lit(k).cast("int")).withColumn("stage_name", F.lit(stage.name))
                          .withColumn("loss", F.lit(stage.loss)))
        table = f"train_set_{variant}"
        union = frames[0]
        for f in frames[1:]:
            union = union.unionByName(f)
        ctx.tables.overwrite(table, union)
        data = ctx.tables.read(table).toPandas()
        manifest = {"variant": variant, "sources": sources, "candidate_status": counts,
                    "table": ctx.tables.qualified_name(table), "table_version": ctx.tables.version(table),
                    "labelled_queries": summary["splits"]}
        if human_counts is not None:
            manifest["human_label_status"] = human_counts
        summary["variants"][variant] = publish_variant(root, stages, data, seeds, cfg, manifest, dev_frames)
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_job("curriculum", __doc__, CurriculumConfig, run, argv)


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine curriculum", main))
