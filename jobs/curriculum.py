"""Stage `curriculum`: mined candidates + graded annotations -> per-stage training sets.

For every configured model variant (`curriculum.variants`: a name and its list of stage names, the stages
defined once in `curriculum.stages`; annomine.curriculum.resolve_variant) it writes the Delta table
`train_set_<variant>` and Parquet shards under a new folder `<shards_dir>/<variant>/run-<tag>/stage<k>_<name>/`
with a `manifest.json` (stages, rows, files, schema, source table versions, composition), then publishes that
folder by rewriting `<shards_dir>/<variant>/manifest.json` last (training.shards): a run killed midway leaves
the previous set published, and its folder is removed by the next run. The shipped configs define
`curriculum` (the judge-graded mined stages) and `human` (one MNR stage on the human labels of the train
queries: the baseline of fine-tuning on the labels a team already has).

Labelled queries are split by `annomine.splits`: only `train` queries reach a training set; `dev` and
`test` queries never do. It also writes the dev evaluation set used for model selection during training
(`<shards_dir>/dev_eval.parquet`, `dev_pool.parquet`, and a copy in each variant's run folder): human labels of the dev queries only (never test),
over their judged products plus a sample of other catalog items. Prints each stage's composition (rows by
class, level and grade) and the number of candidates dropped for annotation errors, ambiguous grades or
dev / test queries.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import functions as F

from annomine import curriculum as cur
from annomine.bounds import bounded
from annomine.errors import MissingInputError
from annomine.publish import run_folder, write_atomically
from annomine.run_summary import write_summary
from annomine.runtime import JobContext, run_job
from annomine.schemas import train_set_table
from annomine.splits import DEV_FRACTION, SEED, TEST_FRACTION, split_of
from training.shards import RUN_PREFIX, prune_shards, publish_shards, write_stage_shards

log = logging.getLogger("annomine.curriculum")


def _default_stages() -> list[cur.StageDef]:
    return [
        cur.StageDef("easy", "bce", ["easy_positive"], ["random_negative", "easy_positive"], max_examples=4000, max_per_query=40),
        cur.StageDef("hard", "mnr", ["hard_positive", "hard_negative", "easy_positive"], ["hard_negative", "hard_positive"],
                     max_examples=3000, max_per_query=30),
        cur.StageDef("token_similar", "triplet", list(cur.CLASSES), ["token_similar_negative"], max_examples=2000, max_per_query=20),
        cur.StageDef("human", "mnr", [cur.HUMAN_LABEL], [cur.HUMAN_LABEL], max_examples=5000, max_per_query=64, source="human"),
    ]


def _default_variants() -> dict[str, list[str]]:
    return {"curriculum": ["easy", "hard", "token_similar"], "human": ["human"]}


VARIANTS_FORM = "a mapping of variant name -> its stage names, e.g. {curriculum: [easy, hard, token_similar], human: [human]}"
# A variant names a table (train_set_<variant>), a shard folder and a model pointer; `best` is the final model's.
_VARIANT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass
class CurriculumConfig:
    # Variant name -> its stages in training order (names of `stages`; `a+b`: stage b's rows mixed into stage a).
    variants: dict[str, list[str]] | list[str] = field(default_factory=_default_variants)
    # Stage definitions, by name: loss, source (mined | set_logic | human), classes, caps (annomine.curriculum.StageDef).
    stages: list[cur.StageDef] = field(default_factory=_default_stages)
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
        if not isinstance(self.variants, dict) or not self.variants:
            raise ValueError(f"variants: {VARIANTS_FORM}; got {self.variants!r}")
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        names = [s.name for s in self.stages]
        twice = sorted({n for n in names if names.count(n) > 1 or cur.BLEND in n})
        if twice:
            raise ValueError(f"stages: names must be unique and without {cur.BLEND!r}: {twice}")
        for s in self.stages:
            s.validate()
        for name in self.variants:
            if not _VARIANT_NAME.fullmatch(str(name)) or name == "best":
                raise ValueError(f"variants.{name}: a variant name is letters, digits and _ (and not 'best')")
            self.variant_stages(name)
        if self.human_positive_min_grade is not None and self.human_positive_min_grade <= self.negative_max_grade:
            raise ValueError("human_positive_min_grade must be above negative_max_grade")
        if not 0 <= self.test_fraction <= self.dev_fraction <= 1:
            raise ValueError("need 0 <= test_fraction <= dev_fraction <= 1")
        if self.negative_max_grade >= self.positive_min_grade:
            raise ValueError("negative_max_grade must be below positive_min_grade")
        for c in self.set_logic_fallback:
            if c not in cur.CLASSES:
                raise ValueError(f"set_logic_fallback: unknown class {c!r}")


    def variant_stages(self, name: str) -> list[cur.StageDef]:
        """The stages of variant `name`, resolved from their definitions."""
        return cur.resolve_variant(name, list(self.variants[name]), self.stages)

    def reads(self, source: str) -> bool:
        """Whether any configured variant has a stage whose rows come (in part) from `source`."""
        return any(st.reads(source) for name in self.variants for st in self.variant_stages(name))


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
        print(f"[{variant}] stage {k} {stage.name} ({stage.loss}): {entry['rows']:,} rows in {len(entry['files'])} files")
        log.debug("[%s] stage %d composition:\n%s", variant, k, _composition_text(comp))
    return entries, skipped


def _composition_text(comp) -> str:
    """A stage's rows by side, level, mined class, grade and label (the manifest keeps the same as records)."""
    lines = []
    by = comp[comp["side"] == "item"].groupby(["level", "candidate_class", "grade", "label"], dropna=False)["rows"].sum()
    for (level, cls, grade, label), n in by.items():
        lines.append(f"    item L{_level(level):<3} {cls:<24} grade={grade!s:<4} label={label!s:<4} rows={n}")
    neg = comp[comp["side"] == "negative"].groupby(["level", "candidate_class", "grade"], dropna=False)["rows"].sum()
    for (level, cls, grade), n in neg.items():
        lines.append(f"    neg  L{_level(level):<3} {cls:<24} grade={grade!s:<4} rows={n}")
    for _, r in comp[comp["side"] == "list_item"].iterrows():
        lines.append(f"    list item grade={r['grade']!s:<4} rows={r['rows']}")
    return "\n".join(lines)


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


def _labelled_by_source(ctx: JobContext, cfg: CurriculumConfig, splits: dict[str, list[str]], annotations):
    """source -> a function giving (labelled rows, status counts) of that source, each built once on first use."""
    products = ctx.tables.read("products")
    cache: dict[str, tuple] = {}

    def rows(source: str) -> tuple:
        if source not in cache:
            if source == "human":
                if not ctx.tables.exists("human_labels"):
                    raise MissingInputError("a configured variant has a human stage: it needs table 'human_labels'; "
                                            "run `annomine ingest`")
                top = cfg.human_positive_min_grade if cfg.human_positive_min_grade is not None else ctx.project.max_grade
                labelled = cur.human_label_rows(ctx.tables.read("human_labels"), ctx.tables.read("queries"), products,
                                                splits["dev"], splits["test"], top, cfg.negative_max_grade)
            else:
                rules = cur.LabelRules(cfg.positive_min_grade, cfg.negative_max_grade, list(cfg.set_logic_fallback),
                                       use_annotations=source == "mined")
                labelled = cur.label_candidates(ctx.tables.read("mined_candidates"), annotations, products,
                                                splits["dev"], rules, splits["test"])
            cache[source] = (labelled, cur.status_counts(labelled))
        return cache[source]
    return rows


def _print_counts(variant: str, what: str, counts: dict[str, int]) -> None:
    print(f"[{variant}] {what}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if counts.get(cur.STALE):
        print(f"[{variant}] {counts[cur.STALE]} candidates' grades were given for an earlier query or product "
              "text and are not used; `annomine annotate` grades them again")


def variant_rows(variant: str, stages: list, rows_of, seed: int, max_group_size: int) -> tuple:
    """(the variant's training rows with `stage`, `stage_name`, `loss`; each stage's seed; candidate counts;
    human-label counts or None). A stage's seed is its position among the stages of its source, so a stage
    gets the same rows in every variant that has it at the same position among its source's stages."""
    counts, human_counts = {}, None
    for source in cur.CANDIDATE_SOURCES:
        if any(s.reads(source) for s in stages):
            counts = rows_of(source)[1]
            _print_counts(variant, "candidates", counts)
    if any(s.reads("human") for s in stages):
        human_counts = rows_of("human")[1]
        _print_counts(variant, "human labels", human_counts)
    seeds = [seed + sum(t.source == st.source for t in stages[:i + 1]) for i, st in enumerate(stages)]
    frames = []
    for k, stage in enumerate(stages, start=1):
        rows = cur.stage_rows(rows_of(stage.source)[0], stage, seeds[k - 1], max_group_size)
        if stage.blend is not None:  # the blended stage's rows (with the seed of its source's first stage) join these
            rows = rows.unionByName(cur.stage_rows(rows_of(stage.blend.source)[0], stage.blend, seed + 1, max_group_size))
        frames.append(rows.withColumn("stage", F.lit(k).cast("int")).withColumn("stage_name", F.lit(stage.name))
                      .withColumn("loss", F.lit(stage.loss)))
    union = frames[0]
    for f in frames[1:]:
        union = union.unionByName(f)
    return union, seeds, counts, human_counts


def run(ctx: JobContext, cfg: CurriculumConfig) -> dict:
    root = shards_root(ctx, cfg)
    sources = {t: ctx.tables.version(t) for t in ("mined_candidates", "annotations", "products", "queries", "human_labels")}
    annotations = None
    if ctx.tables.exists("annotations"):
        annotations = cur.latest_annotations(ctx.tables.read("annotations"), cfg.judge_version)
    elif cfg.reads("mined"):
        raise MissingInputError("table 'annotations' does not exist; run `annomine annotate`, or configure only "
                                "variants whose stages have source set_logic or human")
    splits = labelled_splits(ctx, cfg)
    dev_ids, test_ids = splits["dev"], splits["test"]
    print(f"labelled queries: {len(splits['train'])} train, {len(dev_ids)} dev (selection), "
          f"{len(test_ids)} test (reporting only); dev and test queries reach no training set")
    for variant_root in sorted(p for p in root.glob("*") if p.is_dir()):
        prune_shards(variant_root)  # the leftovers of runs killed before they published
    dev, dev_frames = write_dev_eval(ctx, cfg, dev_ids, root)  # the selection pool: dev queries only, never test
    print(f"dev evaluation set: {dev['queries']} queries, {dev['labels']} labels, pool of {dev['pool']} items")
    summary = {"shards_dir": str(root), "dev": dev, "splits": {k: len(v) for k, v in splits.items()}, "variants": {}}
    rows_of = _labelled_by_source(ctx, cfg, splits, annotations)
    for variant in cfg.variants:
        stages = cfg.variant_stages(variant)
        union, seeds, counts, human_counts = variant_rows(variant, stages, rows_of, cfg.seed, cfg.max_group_size)
        table = train_set_table(variant)
        ctx.tables.overwrite(table, union)
        data = ctx.tables.read(table).toPandas()
        manifest = {"variant": variant, "sources": sources, "candidate_status": counts,
                    "table": ctx.tables.qualified_name(table), "table_version": ctx.tables.version(table),
                    "labelled_queries": summary["splits"]}
        if human_counts is not None:
            manifest["human_label_status"] = human_counts
        summary["variants"][variant] = publish_variant(root, stages, data, seeds, cfg, manifest, dev_frames)
    path = write_summary(ctx.project, "curriculum", summary)
    print(f"curriculum: each stage's rows by mined class, grade and label: the manifests under {root} "
          f"(summary: {path})", flush=True)
    return summary


def outcome(summary: dict) -> str:
    """The pipeline's one-line account of a run: training rows per variant."""
    rows = ", ".join(f"{variant} {sum(s['rows'] for s in manifest.get('stages', [])):,}"
                     for variant, manifest in summary["variants"].items())
    return f"training rows: {rows}; {summary['splits'].get('train', 0)} train queries"


def main(argv: list[str] | None = None) -> int:
    return run_job("curriculum", __doc__, CurriculumConfig, run, argv)


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine curriculum", main))
