"""Stage `rank`: a LambdaMART ranker (LightGBM) over the retriever's top-K, trained on the judge's grades.

    annomine rank --conf conf/local.yaml
    annomine rank --set rank.labels=[raw]            # one label choice only (no polarization)
    annomine rank --set rank.features.groups=[retriever,bm25,channels,coverage,query]   # no cross-encoder features

For every labelled train query and dev query (annomine.splits), the retriever (`rank.retriever`, by default the
pipeline's final two-tower `best`) retrieves its top `rank.features.top_k`; each candidate gets the features of
`annomine.ranking.features` (computed, never read from a label or log table, exactly as for an unseen query).
On the train queries, one ranker is fitted per label choice (`rank.labels`): the judge's raw grade, its
sigmoid-polarized expected grade for every (steepness, centre) of `rank.steepness` x `rank.centres`, and the
human grade where the pair has one; the dev queries' NDCG@10 on human labels picks one. With
`rank.ablations`, the paper's ablations are fitted too: the raw label with the same features (no
polarization) and the chosen label without the cross-encoder features. The rankers are written to
`<outputs>/rankers/<version>/`, then `<outputs>/rankers/current.json` points at it (annomine/ranking/store.py);
MLflow gets the parameters, every choice's dev NDCG@10 and the feature-importance plot.
`annomine evaluate --models ranked,ranked-raw,ranked-no-ce,best+ce` reports them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.config import ConfigError
from annomine.errors import MissingInputError
from annomine.evaluation import inputs as inputs_lib
from annomine.evaluation import metrics as metrics_lib
from annomine.evaluation.catalog import EncodeSettings, ModelSpecError, model_key
from annomine.model_specs import resolve_specs
from annomine.ranking import store
from annomine.ranking.features import FeatureSettings, FeatureSources, build_features, columns_of
from annomine.ranking.labels import LABEL_CHOICES
from annomine.ranking.model import START_COLUMNS, RankerParams
from annomine.ranking.plots import plot_importance
from annomine.ranking.tier1 import Tier1Scores, cache_folder
from annomine.ranking.training import LabelChoice, attach_targets, dev_ndcg, fit_and_select, fit_one, label_choices
from annomine.runtime import JobContext, run_job
from annomine.splits import split_of
from annomine.tracking import Tracker

log = logging.getLogger("annomine.rank")

CE_PREFIX = "ce_"
TRAIN_QUERY_CHOICES = ("train", "calibration")  # the columns of the cross-encoder feature group


@dataclass
class RankConfig:
    # The dense retriever whose top-K is ranked: an evaluate model spec (best, a variant name, minilm, a folder).
    retriever: str = "best"
    # The judge whose tier 1 gives the cross-encoder features and the judge's labels; unset: the current judge.
    judge: str | None = None
    # Candidates, channel depth, feature groups, engagement columns (annomine/ranking/features.py).
    features: FeatureSettings = field(default_factory=FeatureSettings)
    # Label choices compared on the dev queries: raw (the judge's grade), polarized (sigmoid of its expected
    # grade), human (human grade where the pair has one, else the judge's).
    labels: list[str] = field(default_factory=lambda: list(LABEL_CHOICES))
    # What the ranker's score starts from, each listed start compared on dev: `zero` (plain LambdaMART) or `ce`
    # (tier 1's expected grade: the trees learn corrections to the cross-encoder's order).
    start_from: list[str] = field(default_factory=lambda: ["zero"])
    # Sigmoid steepnesses and centres tried for `polarized` (centre on the expected grade scaled to [0, 1]).
    steepness: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0])
    centres: list[float] = field(default_factory=lambda: [0.5, 0.67, 0.83])
    # Which train queries the ranker learns from, each compared on dev: `train` (every labelled train query) and
    # `calibration` (only the judge's calibration queries: the cross-encoder never trained on them, so its scores
    # there are as unreliable as on a new query).
    train_queries: list[str] = field(default_factory=lambda: list(TRAIN_QUERY_CHOICES))
    # judge.calibration_fraction: which train queries are the judge's calibration queries (checked against the judge).
    calibration_fraction: float = 0.25
    # Also fit the ablations: the raw label (no polarization) and the chosen label without cross-encoder features.
    ablations: bool = False
    # Use the cascade's grade (annotations) where a candidate has one; else tier 1's grade for every candidate.
    use_annotations: bool = True
    # How queries and the catalog are encoded (as `evaluate.encode`; embeddings are cached and shared with it).
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    ranker: RankerParams = field(default_factory=RankerParams)
    mlflow: bool = True

    def validate(self) -> None:
        self.features.validate()
        self.ranker.validate()
        unknown = sorted(set(self.labels) - set(LABEL_CHOICES))
        if unknown or not self.labels:
            raise ValueError(f"labels must name one or more of {list(LABEL_CHOICES)}, got {self.labels}")
        if "polarized" in self.labels and (not self.steepness or not self.centres):
            raise ValueError("the polarized label needs at least one steepness and one centre")
        if not self.train_queries or sorted(set(self.train_queries) - set(TRAIN_QUERY_CHOICES)):
            raise ValueError(f"train_queries must name one or more of {list(TRAIN_QUERY_CHOICES)}, got {self.train_queries}")
        if not self.start_from or sorted(set(self.start_from) - set(START_COLUMNS)):
            raise ValueError(f"start_from must name one or more of {list(START_COLUMNS)}, got {self.start_from}")
        if not 0 < self.calibration_fraction < 1:
            raise ValueError("calibration_fraction must be in (0, 1) (= judge.calibration_fraction)")
        if any(s <= 0 for s in self.steepness) or any(not 0 < c < 1 for c in self.centres):
            raise ValueError("steepness values must be > 0 and centres in (0, 1)")


CONFIG_CLASS = RankConfig


def labelled_queries(ctx: JobContext) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(queries, merged human labels, query_id -> segment) from the tables."""
    from jobs.evaluate import query_segments

    project = ctx.project
    queries = inputs_lib.queries_from_table(ctx.tables)
    source = f"table {ctx.tables.qualified_name('human_labels')}"
    labels, rejected = metrics_lib.merge_labels(inputs_lib.labels_from_table(ctx.tables), project.min_grade,
                                                project.max_grade, source)
    if len(rejected):
        log.warning("%s: %d label rows rejected, e.g. %s", source, len(rejected), rejected.head(3).to_dict("records"))
    segments, _ = query_segments(queries, project.segments)
    return queries, labels[labels["query_id"].isin(set(queries["query_id"]))], segments.to_dict()


def split_ids(labels: pd.DataFrame, project, calibration_fraction: float) -> dict[str, list[str]]:
    """train, dev and calibration (the judge's calibration queries among train: `annomine.judges.data.assign_splits`)."""
    from annomine.judges.data import assign_splits

    of = functools.partial(split_of, fold=project.fold, rotation=project.rotation)
    ids = sorted(labels["query_id"].unique())
    out = {name: [q for q in ids if of(q) == name] for name in ("train", "dev")}
    for name, found in out.items():
        if not found:
            raise MissingInputError(f"table human_labels has no labelled {name} queries (annomine.splits); "
                                    "the ranker trains on train queries and is chosen on dev queries")
    judge_split = assign_splits(pd.DataFrame({"query_id": out["train"]}), calibration_fraction, project.seed,
                                project.fold, project.rotation)
    out["calibration"] = [q for q, s in zip(out["train"], judge_split) if s == "calibration"]
    return out


def check_calibration_queries(judge: Path, n_found: int, cfg: RankConfig) -> None:
    """The judge's metrics.json says how many calibration queries it had: rank.calibration_fraction must agree."""
    try:
        recorded = json.loads((judge / "metrics.json").read_text())["splits"]["calibration"]["queries"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if "calibration" in cfg.train_queries and recorded != n_found:
        raise ConfigError(f"rank.calibration_fraction {cfg.calibration_fraction} gives {n_found} calibration queries, but "
                          f"the judge {judge.name} was calibrated on {recorded}: set it to judge.calibration_fraction")


def retriever_of(ctx: JobContext, cfg: RankConfig):
    project = ctx.project
    try:
        specs = resolve_specs(cfg.retriever, project.warehouse_path, project.tracking_uri,
                              registry=project.outputs_path / "models")
    except ModelSpecError as exc:
        raise MissingInputError(f"rank.retriever {cfg.retriever!r}: {exc}") from exc
    if len(specs) != 1 or specs[0].kind == "bm25" or specs[0].fusion:
        raise ConfigError(f"rank.retriever {cfg.retriever!r}: must name one dense model (best, a variant, minilm, a folder)")
    return specs[0]


def judge_folder(ctx: JobContext, cfg: RankConfig) -> Path:
    from annomine.judges.store import resolve_judge

    try:
        return resolve_judge(ctx.project.warehouse_path, cfg.judge)
    except FileNotFoundError as exc:
        raise MissingInputError(str(exc)) from exc


def annotations_of(ctx: JobContext, query_ids: list[str]) -> pd.DataFrame | None:
    if not ctx.tables.exists("annotations"):
        return None
    from pyspark.sql import functions as F

    return (ctx.tables.read("annotations").where(F.col("query_id").isin(list(query_ids)))
            .select("query_id", "product_id", "grade", "deciding_tier", "tier_outputs", "annotated_at").toPandas())


def llm_grades_of(annotations: pd.DataFrame | None) -> pd.DataFrame | None:
    """tier2_expected / tier3_expected per annotated pair (the `llm` feature group)."""
    if annotations is None or annotations.empty:
        return None
    latest = annotations.sort_values("annotated_at").drop_duplicates(["query_id", "product_id"], keep="last")
    parsed = [json.loads(t or "{}") for t in latest["tier_outputs"]]
    return latest[["query_id", "product_id"]].assign(
        **{f"{tier}_expected": [(p.get(tier) or {}).get("expected_grade", np.nan) for p in parsed] for tier in ("tier2", "tier3")})


def engagement_of(ctx: JobContext, columns: list[str]) -> pd.DataFrame | None:
    if not columns:
        return None
    products = ctx.tables.read("products")
    missing = [c for c in columns if c not in products.columns]
    if missing:
        log.warning("table %s has no engagement column(s) %s: those features stay missing",
                    ctx.tables.qualified_name("products"), missing)
    present = [c for c in columns if c in products.columns]
    return products.select("product_id", *present).toPandas() if present else None


def train_rankers(frame: pd.DataFrame, ids: dict, dev_labels: pd.DataFrame, cfg: RankConfig, columns: list[str],
                  project) -> tuple[dict, dict]:
    """{variant: Ranker} (ranked and, with ablations, ranked-raw / ranked-no-ce) and the selection record: every
    (train queries, label) choice is fitted and the best dev NDCG@10 wins (ties: the earlier)."""
    dev = frame[frame["query_id"].isin(ids["dev"])].reset_index(drop=True)
    starts = tuple(s for s in cfg.start_from if START_COLUMNS[s] is None or START_COLUMNS[s] in frame.columns)
    if not starts:
        raise ValueError(f"rank.start_from {cfg.start_from}: no start whose column the features have "
                         f"(rank.features.groups {cfg.features.groups})")
    choices = label_choices(cfg.labels, cfg.steepness, cfg.centres, starts)
    g = (project.min_grade, project.max_grade)
    best, results = None, []
    for queries in cfg.train_queries:
        subset = frame[frame["query_id"].isin(ids[queries])].reset_index(drop=True)
        if subset.empty:
            raise MissingInputError(f"no {queries} queries to train the ranker on (rank.train_queries)")
        ranker, chosen, found = fit_and_select(subset, dev, dev_labels, columns, choices, cfg.ranker, *g, project.seed)
        results += [dict(r, train_queries=queries) for r in found]
        score = max(r["dev_ndcg@10"] for r in found if r["choice"] == chosen.name)
        if best is None or score > best[0]:
            best = (score, ranker, chosen, queries, subset)
    score, ranker, chosen, queries, train = best
    rankers = {"ranked": ranker}
    record = {"choices": results, "chosen": chosen.as_dict() | {"name": chosen.name, "train_queries": queries},
              "dev_ndcg@10": {"ranked": score,
                              "retriever": dev_ndcg(dev, -dev["retriever_rank"].to_numpy(), dev_labels, *g),
                              "tier1": dev_ndcg(dev, dev["ce_expected"].to_numpy(), dev_labels, *g)
                              if "ce_expected" in dev else None},
              "n_train_queries": int(train["query_id"].nunique()), "n_train_rows": len(train),
              "n_dev_queries": int(dev["query_id"].nunique())}
    if cfg.ablations:
        raw = LabelChoice("raw", start=chosen.start)
        rankers["ranked-raw"] = fit_one(train, columns, raw, cfg.ranker, *g, project.seed)
        no_ce = [c for c in columns if not c.startswith(CE_PREFIX)]
        rankers["ranked-no-ce"] = fit_one(train, no_ce, dataclasses.replace(chosen, start="zero"), cfg.ranker, *g,
                                          project.seed)
        for name in ("ranked-raw", "ranked-no-ce"):
            record["dev_ndcg@10"][name] = dev_ndcg(dev, rankers[name].score(dev), dev_labels, *g)
    return rankers, record


def write_rankers(ctx: JobContext, cfg: RankConfig, rankers: dict, record: dict, retriever, judge: Path,
                  tier1: Tier1Scores) -> tuple[Path, Path]:
    """The ranker folder (models, rank.json, importance plot), then the pointer; (folder, plot)."""
    project = ctx.project
    version = f"rank-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    folder = store.rankers_dir(project.outputs_path) / version
    for variant, ranker in rankers.items():
        ranker.save(folder, store.VARIANT_FILES[variant])
    plot = plot_importance(rankers["ranked"].importance(), folder / "feature_importance.png",
                           f"ranker feature importance (label: {record['chosen']['name']})")
    meta = {"version": version, "folder": store.relative_to(folder, project.warehouse_path), "created_at": pd.Timestamp.now("UTC").isoformat(),
            "retriever": {"label": retriever.label, "kind": retriever.kind, "source": retriever.source,
                          "model_key": model_key(retriever, cfg.encode)},
            "retriever_path": store.relative_to(retriever.path, project.warehouse_path),
            "judge_path": store.relative_to(judge, project.warehouse_path), "judge_version": tier1.version,
            "grades": tier1.grades, "features": dataclasses.asdict(cfg.features),
            "variants": {v: store.VARIANT_FILES[v] for v in rankers}, "selection": record,
            "fold": project.fold, "rotation": project.rotation}
    (folder / store.META).write_text(json.dumps(meta, indent=2, default=str))
    store.publish(folder, project.outputs_path, project.warehouse_path, version)
    return folder, plot


def run(ctx: JobContext, cfg: RankConfig) -> dict:
    from annomine.retrievers.embeddings import vectors_by_text
    from jobs.evaluate import stored_vectors

    started = time.time()
    project = ctx.project
    queries, labels, segments = labelled_queries(ctx)
    ids = split_ids(labels, project, cfg.calibration_fraction)
    retriever, judge = retriever_of(ctx, cfg), judge_folder(ctx, cfg)
    check_calibration_queries(judge, len(ids["calibration"]), cfg)
    cache_dir = project.warehouse_path / "cache"
    catalog, _ = inputs_lib.catalog_from_table(ctx.tables)
    tier1 = Tier1Scores(judge, cache_folder(cache_dir))
    if tier1.text_vector_key:  # the stack's cosine feature reads the ANN channel's vectors of the same model
        by_text = vectors_by_text(ctx, tier1.text_vector_key)
        tier1.model.remember_text_vectors(list(by_text), list(by_text.values()))
    sources = FeatureSources(catalog, retriever, tier1, cfg.encode, cache_dir / "eval_embeddings", ctx.spark,
                             stored_vectors(ctx))
    wanted = ids["train"] + ids["dev"]
    text_of = dict(zip(queries["query_id"], queries["query"]))
    annotations = annotations_of(ctx, ids["train"]) if cfg.use_annotations or "llm" in cfg.features.groups else None
    print(f"rank: features for {len(ids['train'])} train and {len(ids['dev'])} dev queries, top {cfg.features.top_k} of "
          f"{retriever.label}, over {len(catalog)} products", flush=True)
    frame = build_features(sources, wanted, [text_of[q] for q in wanted], cfg.features, segments,
                           llm_grades_of(annotations) if "llm" in cfg.features.groups else None,
                           engagement_of(ctx, cfg.features.engagement_columns))
    tier1_grades = tier1.decide(frame[[c for c in frame.columns if c.startswith("ce_p")]].to_numpy())
    human = labels[labels["query_id"].isin(ids["train"])]
    frame = attach_targets(frame, tier1_grades, annotations if cfg.use_annotations else None, human)
    columns = columns_of(cfg.features.groups, tier1.grades, cfg.features.engagement_columns)
    rankers, record = train_rankers(frame, ids, labels[labels["query_id"].isin(ids["dev"])], cfg, columns, project)
    folder, plot = write_rankers(ctx, cfg, rankers, record, retriever, judge, tier1)
    stats = {"folder": str(folder), "selection": record, "tier1_scored_pairs": tier1.scored,
             "seconds": round(time.time() - started, 1)}
    stats["mlflow_run_id"] = _track(ctx, cfg, record, folder, plot)
    print(summary_lines(record, folder), flush=True)
    return stats


def summary_lines(record: dict, folder: Path) -> str:
    dev = record["dev_ndcg@10"]
    lines = [f"rank: chose {record['chosen']['name']} trained on the {record['chosen']['train_queries']} queries, on "
             f"{record['n_dev_queries']} dev queries "
             f"(trained on {record['n_train_queries']} train queries, {record['n_train_rows']} candidates)"]
    lines += [f"  dev NDCG@10 {name:<14} {value:.4f}" for name, value in dev.items() if value is not None]
    lines.append(f"rank: ranker {folder} (pointer {folder.parent / store.POINTER})")
    return "\n".join(lines)


def _track(ctx: JobContext, cfg: RankConfig, record: dict, folder: Path, plot: Path) -> str | None:
    params = {"retriever": cfg.retriever, "labels": ",".join(cfg.labels), "chosen_label": record["chosen"]["name"],
              "features": ",".join(cfg.features.groups), "top_k": cfg.features.top_k, "channel_k": cfg.features.channel_k,
              **{f"ranker_{k}": v for k, v in dataclasses.asdict(cfg.ranker).items()}}
    with Tracker(ctx.project, cfg.mlflow).run("rank", params) as tracked:
        tracked.metrics({f"dev_ndcg_at_10_{name.replace('-', '_')}": v for name, v in record["dev_ndcg@10"].items()
                         if v is not None})
        tracked.metrics({f"dev_ndcg_at_10_choice_{i}": r["dev_ndcg@10"] for i, r in enumerate(record["choices"])})
        tracked.artifacts([plot, folder / store.META], folder="ranker")
    return tracked.run_id


def outcome(stats: dict) -> str:
    """The pipeline's one-line account of a run: the label choice the dev queries preferred."""
    record = stats["selection"]
    return (f"ranker on {record['chosen']['name']} labels, {record['n_train_queries']} train queries, "
            f"{record['n_train_rows']:,} candidates")


def main(argv: list[str] | None = None) -> int:
    return run_job("rank", __doc__, RankConfig, run, argv)


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine rank", main))
