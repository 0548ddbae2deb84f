"""Stage `evaluate`: retrieve top-100 over the whole catalog per labelled query, score against human labels.

    annomine evaluate --model M --products F --queries F --labels F --out report.json
    annomine evaluate --models bm25,minilm,best            # the test split (the default)
    annomine evaluate --models bm25,minilm,best --split dev
    annomine evaluate --set project.fold=1 ...              # the other fold: dev and test swapped

M is `bm25`, `minilm` (zero-shot), a model folder, `best` / a variant name (<warehouse>/models/*.json),
`variants` (all of them), or an MLflow model URI (runs:/..., models:/...); any dense one suffixed with `+bm25`
(`minilm+bm25`, `variants+bm25`) is a hybrid, its ranking fused with BM25's by reciprocal rank fusion
(`minilm+bm25` is then a zero-shot baseline too); suffixed with `+ce` (`best+ce`) its top-k is reordered by the
current judge's tier-1 expected grade. `ranked` is the rank stage's ranker over its retriever's top-K (`ranked-raw`,
`ranked-no-ce`: its ablations), built for each query from the query text alone, so outside files work too; a
ranked list is compared, paired, with every other evaluated list. Without files, the
ingested tables are used (products, queries, human_labels). Writes the JSON report (NDCG@10 with
unjudged = 0 and judged-only, lowest-grade share of the judged top 10, Recall@100 of top-grade
items, per query segment, with bootstrap CIs, plus per-query rows), a markdown report and PNG
plots next to it, logs them to MLflow, and registers the final model: the list with the best dev NDCG@10 among the
pipeline's two-towers, a two-tower reranked by the judge (`best+ce`) and the rank stage's list
(annomine/registration.py).

Splits (annomine.splits): `test` (the default) is for reporting only: no stage, epoch, setting or
registration was chosen on it. `dev` is the selection split: the trainer's checks and the model
registration use it, also when the report is on test (the dev queries are then ranked too, for
`dev_ndcg@10` only, outside the report's metrics). `train`: the judge's and training sets' queries.
With `project.fold: 1` the dev and test halves swap roles (a fold's models and reports live under
<warehouse>/folds/fold1/). With `project.rotation: N` another block of the open labelled queries is held out,
in a warehouse of its own (<warehouse>/rotations/rotation<N>/: its own judge and training sets). The lab pools
the folds' and rotations' test reports into one (`python -m lab.pool`).
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.bounds import bounded
from annomine.config import SegmentsConfig
from annomine.evaluation import inputs as inputs_lib
from annomine.evaluation import metrics as metrics_lib
from annomine.evaluation import report as report_lib
from annomine.model_specs import EncodeSettings, ModelSpec, ModelSpecError, resolve_specs, retrieve
from annomine.registration import register_best
from annomine.runtime import JobContext, job_parser, load, open_context, setup_logging
from annomine.splits import SPLITS as QUERY_SPLITS
from annomine.splits import split_of
from annomine.tracking import use_experiment

log = logging.getLogger("annomine.evaluate")

SPLITS = (*QUERY_SPLITS, "all")
# What each split is for, in the printed header and the report's `split_role`.
SPLIT_ROLES = {
    "test": "reporting only, never used for selection (stages, epochs, settings, registration)",
    "dev": "the selection split (stage checks, epochs, settings, registration); not an unbiased estimate",
    "train": "the judge was trained on these queries and they may appear in training sets",
    "all": "every labelled query (train, dev and test together)",
}
SELECTION_NOTES = {
    "test": "test queries were never used for selection",
    "dev": "these are the selection queries themselves",
    "train": "train queries may appear in training sets",
    "all": "these queries include the selection (dev) and training queries",
}


@dataclass
class EvaluateConfig:
    # Model specs to compare (see the module doc). Registry names that do not exist yet (e.g. `best`
    # before any training) are skipped with a notice when `skip_missing` is true.
    models: list[str] = field(default_factory=lambda: ["bm25", "minilm", "minilm+bm25", "variants"])
    # Trained variants every other model is also compared with (paired NDCG@10) when evaluated: `human`, what a
    # team with labels would do without this pipeline (train.baselines).
    compare_with: list[str] = field(default_factory=lambda: ["human"])
    skip_missing: bool = True
    # Files in the CrowdFlower layout; unset = the ingested tables.
    products: str | None = None
    queries: str | None = None
    labels: str | None = None
    # test (reporting only, never used for selection) | dev (selection) | train | all
    split: str = "test"
    top_k: int = bounded(100, ge=10)  # NDCG@10 needs ten results
    # Report JSON; unset = <warehouse>/evaluation/report_<split>.json (markdown and PNGs next to it).
    out: str | None = None
    # How queries and the catalog are encoded and indexed (lengths, batch, Spark above a size, cache, FAISS index).
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    # Fewer than 100 resamples cannot place a confidence interval's ends (0 gives zero-width intervals).
    bootstrap_resamples: int = bounded(1000, ge=100)
    confidence: float = bounded(0.95, ge=0.5, lt=1)
    mlflow: bool = True
    register: bool = True
    registered_model_name: str = "annomine-two-tower"

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if not self.models:
            raise ValueError("models must name at least one model")
        self.encode.index.validate()


CONFIG_CLASS = EvaluateConfig


def load_inputs(ctx: JobContext, cfg: EvaluateConfig):
    """(catalog, catalog facts, queries, raw labels, sources) from files or tables."""
    if cfg.products:
        catalog, facts = inputs_lib.catalog_from_file(cfg.products)
    else:
        catalog, facts = inputs_lib.catalog_from_table(ctx.tables)
    queries = inputs_lib.queries_from_file(cfg.queries) if cfg.queries else inputs_lib.queries_from_table(ctx.tables)
    labels = inputs_lib.labels_from_file(cfg.labels) if cfg.labels else inputs_lib.labels_from_table(ctx.tables)
    sources = {"products": facts["source"], "queries": cfg.queries or f"table {ctx.tables.qualified_name('queries')}",
               "labels": cfg.labels or f"table {ctx.tables.qualified_name('human_labels')}"}
    return catalog, facts, queries, labels, sources


def query_segments(queries: pd.DataFrame, rule: SegmentsConfig) -> tuple[pd.Series, str]:
    """Segment per query_id: the table's frequency segments when complete, else `assign_segments`."""
    if "segment" in queries.columns and len(queries) and queries["segment"].notna().all():
        return pd.Series(queries["segment"].values, index=queries["query_id"]), "frequency (segments of the queries table)"
    seg, how = metrics_lib.assign_segments(queries, rule.head_share, rule.torso_share)
    return pd.Series(seg.values, index=queries["query_id"]), how


def resolve_models(ctx: JobContext, cfg: EvaluateConfig, strict: bool) -> tuple[list[ModelSpec], list[dict]]:
    specs, skipped = [], []
    for text in cfg.models:
        try:
            specs.extend(resolve_specs(text, ctx.project.warehouse_path, ctx.project.tracking_uri,
                                       registry=ctx.project.outputs_path / "models"))
        except ModelSpecError as exc:
            if strict or not cfg.skip_missing:
                raise
            log.warning("model %s skipped: %s", text, exc)
            skipped.append({"model": text, "reason": str(exc)})
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ModelSpecError(f"two models share the label(s) {dupes}; name them: label=spec")
    if not specs:
        raise ModelSpecError(f"no model to evaluate (skipped: {skipped})")
    return specs, skipped


def stored_vectors(ctx: JobContext):
    """`retrieve`'s `stored`: the zero-shot MiniLM baseline's catalog vectors from `product_embeddings`, which the
    ANN channel writes for the same model, product text and length (`minilm@<item_max_len>`), when every product of
    a products-table catalog has one encoded from its current text; None otherwise (it is then encoded)."""
    from annomine.encoders import MINILM
    from annomine.retrievers.embeddings import current_vectors, vector_key

    def lookup(spec, catalog, settings):
        if spec.kind != "minilm" or catalog.frame is None:  # a file catalog's texts need not be the table's
            return None
        vectors = current_vectors(ctx, vector_key(MINILM, settings.item_max_len))
        if vectors is None:
            return None
        rows = vectors.toPandas()
        by_id = dict(zip(rows["product_id"].astype(str), rows["embedding"]))
        if not all(pid in by_id for pid in catalog.ids):
            return None
        return np.stack([np.asarray(by_id[pid], dtype=np.float32) for pid in catalog.ids])

    return lookup


def teacher_check(warehouse, fold: int = 0) -> dict | None:
    """The current judge's order of the dev/test queries' labelled products against the zero-shot bi-encoder's
    (`annomine judge train` writes it to the judge's metrics.json; annomine/judges/ranking.py). A guide to what a
    retriever trained on the judge's grades can learn; None without a judge or without the check. The halves are
    named as in `fold`: a judge trained in the other fold measured the same queries under the swapped names."""
    import json

    from annomine.judges.store import resolve_judge

    try:
        metrics = json.loads((resolve_judge(warehouse, None) / "metrics.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    names = {"dev": "dev", "test": "test"} if metrics.get("fold", 0) == fold else {"dev": "test", "test": "dev"}
    found = {names[split]: metrics.get(f"{split}_tier1", {}).get("ranking") for split in ("dev", "test")}
    found = {split: r for split, r in found.items() if r}
    if not found:
        return None
    return {"judge_version": metrics.get("version"),
            **{split: {key: r.get(key) for key in ("n_queries", "baseline", "judge_ndcg@10", "baseline_ndcg@10", "diff", "ratio")}
               for split, r in found.items()}}


@dataclass
class _Queries:
    """The evaluated queries and their labels, and the dev queries ranked beside them for selection only."""
    labels: pd.DataFrame
    dev_labels: pd.DataFrame
    eval_ids: list
    dev_ids: list
    text_of: dict
    segments: pd.Series
    split_of_query: object


def _queries(ctx: JobContext, cfg: EvaluateConfig, queries: pd.DataFrame, raw_labels: pd.DataFrame, sources: dict):
    """The report's queries and labels (the split's), the dev queries for selection, the rejected label rows and
    the labelled queries missing from the queries file."""
    project = ctx.project
    labels, rejected = metrics_lib.merge_labels(raw_labels, project.min_grade, project.max_grade, sources["labels"])
    if len(rejected):
        log.warning("%s: %d label rows rejected, e.g. %s", sources["labels"], len(rejected), rejected.head(3).to_dict("records"))
    segments, segment_rule = query_segments(queries, ctx.project.segments)
    known_queries = set(queries["query_id"])
    orphan = sorted(set(labels["query_id"]) - known_queries)
    labels = labels[labels["query_id"].isin(known_queries)]
    split_of_query = functools.partial(split_of, fold=project.fold, rotation=project.rotation)
    split = labels["query_id"].map(split_of_query)
    # Registration selects on dev: when the report's split has no dev query, the dev queries are ranked
    # too, for each model's `dev_ndcg@10` only (never in the report's metrics or per-query rows).
    dev_labels = labels[split == "dev"].reset_index(drop=True) if cfg.split in ("test", "train") else labels.iloc[:0]
    if cfg.split != "all":
        labels = labels[split == cfg.split]
    labels = labels.reset_index(drop=True)
    eval_ids = sorted(labels["query_id"].unique())
    if not eval_ids:
        raise ValueError(f"no labelled queries in split '{cfg.split}' (labels: {sources['labels']}, queries: {sources['queries']})")
    chosen = _Queries(labels, dev_labels, eval_ids, sorted(dev_labels["query_id"].unique()),
                      dict(zip(queries["query_id"], queries["query"])), segments, split_of_query)
    return chosen, rejected, orphan, segment_rule


def _selection(q: _Queries, cfg: EvaluateConfig, n_products: int, specs) -> tuple[dict, dict]:
    """Segment counts of the report's queries and of the dev queries that select; prints what is evaluated."""
    seg_counts = {s: int((q.segments.reindex(q.eval_ids) == s).sum()) for s in metrics_lib.SEGMENTS}
    # the dev queries: ranked beside the report's split for selection only, or inside it (split dev or all)
    selection_ids = q.dev_ids or [i for i in q.eval_ids if q.split_of_query(i) == "dev"]
    selection_counts = {s: int((q.segments.reindex(selection_ids) == s).sum()) for s in metrics_lib.SEGMENTS}
    unseen = [s for s in metrics_lib.SEGMENTS if seg_counts[s] and not selection_counts[s]] if selection_ids else []
    print(f"evaluate: {len(q.eval_ids)} queries (split {cfg.split}: {SPLIT_ROLES[cfg.split]}), {len(q.labels)} labels, "
          f"{n_products} products, models {[s.label for s in specs]}"
          + (f"; {len(q.dev_ids)} dev queries ranked for the registration's dev NDCG@10 only" if q.dev_ids else ""))
    if unseen:  # the selection never saw this kind of query: its choices say nothing about them
        print(f"evaluate: note: the dev split (every training-time choice) holds no {'/'.join(unseen)} queries; this "
              f"report has {', '.join(f'{seg_counts[s]} {s}' for s in unseen)}")
    return seg_counts, {"split": "dev", "n_dev_queries": len(selection_ids), "segment_counts": selection_counts,
                        "note": "registration and every training-time choice use dev NDCG@10; " + SELECTION_NOTES[cfg.split]}


def _evaluate_model(ctx: JobContext, cfg: EvaluateConfig, spec: ModelSpec, catalog, q: _Queries) -> tuple[dict, list]:
    """One model's report entry (metrics with CIs, dev NDCG@10, grade distribution) and its per-query rows."""
    project = ctx.project
    t0 = time.time()
    ranked_lists, info = retrieve(spec, catalog, [q.text_of[i] for i in q.eval_ids + q.dev_ids], cfg.top_k, cfg.encode,
                                  project.warehouse_path / "cache" / "eval_embeddings", spark=ctx.spark,
                                  stored=stored_vectors(ctx), segments=[q.segments.get(i) for i in q.eval_ids + q.dev_ids])
    ranked = dict(zip(q.eval_ids, ranked_lists[:len(q.eval_ids)]))
    per_query = metrics_lib.per_query_metrics(ranked, q.labels, project.min_grade, project.max_grade, k=10, recall_k=cfg.top_k)
    summary = metrics_lib.summarise(per_query, q.segments, cfg.bootstrap_resamples, cfg.confidence, project.seed)
    per_query["split"] = per_query["query_id"].map(q.split_of_query)
    if q.dev_ids:  # selection only: the dev queries' metrics stay out of the report's tables
        dev_ranked = dict(zip(q.dev_ids, ranked_lists[len(q.eval_ids):]))
        dev_rows = metrics_lib.per_query_metrics(dev_ranked, q.dev_labels, project.min_grade, project.max_grade, k=10,
                                                 recall_k=cfg.top_k)
        dev_values = dev_rows["ndcg@10"].dropna()
    else:
        dev_values = per_query.loc[per_query["split"] == "dev", "ndcg@10"].dropna()
    info["total_s"] = round(time.time() - t0, 1)
    model = {"label": spec.label, "spec": spec.as_dict(), "retrieval": info, "metrics": summary,
             "dev_ndcg@10": float(dev_values.mean()) if len(dev_values) else None,
             "grade_distribution@10": metrics_lib.grade_distribution(per_query, project.min_grade, project.max_grade)}
    rows = []
    for row in per_query.to_dict("records"):
        row.update({"model": spec.label, "query": q.text_of[row["query_id"]], "segment": q.segments.get(row["query_id"])})
        rows.append(row)
    print(f"evaluate: {spec.label} ranked in {info['total_s']}s", flush=True)
    return model, rows


def _comparisons(specs, per_query_rows: list, cfg: EvaluateConfig, seed: int) -> list:
    """Each model paired with the better baseline and with `compare_with`; the rank stage's lists with every list."""
    if not per_query_rows:
        return []
    rows = pd.DataFrame(per_query_rows)
    labels = [s.label for s in specs]
    comparisons = metrics_lib.compare_to_baselines(rows, [s.label for s in specs if s.baseline], labels,
                                                   cfg.bootstrap_resamples, cfg.confidence, seed,
                                                   also_against=tuple(cfg.compare_with))
    ranked = [s.label for s in specs if s.kind == "ranked"]
    if ranked:  # the rank stage's lists against every other list, paired
        comparisons += metrics_lib.ranked_comparisons(rows, ranked, labels, cfg.bootstrap_resamples, cfg.confidence,
                                                      seed, known=comparisons)
    return comparisons


def _write_report(ctx: JobContext, cfg: EvaluateConfig, report: dict, specs, catalog) -> tuple[Path, Path, list]:
    """The report as JSON and markdown with its plots; logged to MLflow and the final model registered when asked."""
    project = ctx.project
    out = report_path(project, cfg)
    report_lib.write_json(report, out)
    md = out.with_suffix(".md")
    plot_files = report_lib.plot_paths(out)
    plots = [report_lib.plot_metrics(report, plot_files["metrics"]), report_lib.plot_grades(report, plot_files["grades"]),
             report_lib.plot_data_curve(report, plot_files["data"])]
    md.write_text(report_lib.markdown(report))
    if cfg.mlflow:
        use_experiment(project)  # created with its artifacts in the warehouse, not in ./mlruns of the working directory
        report["mlflow_run_id"] = report_lib.log_to_mlflow(report, [out, md, *plots], project.tracking_uri, project.mlflow_experiment)
        if cfg.register and (project.fold != 0 or project.rotation != 0):
            print(f"evaluate: rotation {project.rotation}, fold {project.fold}: nothing registered "
                  "(the pipeline's final model is rotation 0's, fold 0's)")
        elif cfg.register:
            name = cfg.registered_model_name
            if project.catalog and "." not in name:  # Unity Catalog models live in catalog.schema
                name = f"{project.catalog}.{project.schema}.{name}"
            report["registration"] = register_best(report, {s.label: s for s in specs}, project.tracking_uri,
                                                              project.mlflow_experiment, name, out, catalog=catalog,
                                                              references=tuple(cfg.compare_with))
        report_lib.write_json(report, out)
        md.write_text(report_lib.markdown(report))
    return out, md, plots


def run(ctx: JobContext, cfg: EvaluateConfig, strict_models: bool = False, command: str | None = None) -> dict:
    started = time.time()
    project = ctx.project
    catalog, catalog_facts, queries, raw_labels, sources = load_inputs(ctx, cfg)
    q, rejected, orphan, segment_rule = _queries(ctx, cfg, queries, raw_labels, sources)
    unknown_products = int((~q.labels["product_id"].isin(set(catalog.ids))).sum())
    if unknown_products:
        log.warning("%d labels name products that are not in the catalog (they count as not retrieved)", unknown_products)
    specs, skipped = resolve_models(ctx, cfg, strict_models)
    seg_counts, selection = _selection(q, cfg, len(catalog), specs)
    models, per_query_rows = [], []
    for spec in specs:
        model, rows = _evaluate_model(ctx, cfg, spec, catalog, q)
        models.append(model)
        per_query_rows += rows
    report = {
        "created_at": pd.Timestamp.now("UTC").isoformat(),
        "split": cfg.split, "split_role": SPLIT_ROLES[cfg.split], "fold": project.fold, "rotation": project.rotation,
        "selection": selection, "k": 10, "recall_k": cfg.top_k, "index": cfg.encode.index.kind,
        "grade_scale": {"min": project.min_grade, "max": project.max_grade, "gain": "grade - min_grade"},
        "metrics": metrics_lib.METRICS,
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": project.seed},
        "segment_rule": segment_rule, "segment_counts": seg_counts,
        "inputs": {**sources, "n_products": len(catalog), "catalog": catalog_facts, "n_queries_in_file": len(queries),
                   "n_queries_evaluated": len(q.eval_ids), "n_label_rows": len(raw_labels), "n_labels": len(q.labels),
                   "n_rejected_label_rows": len(rejected), "rejected_label_rows": rejected.head(100).to_dict("records"),
                   "labels_for_unknown_products": unknown_products,
                   "labelled_queries_not_in_queries_file": len(orphan)},
        "teacher": teacher_check(project.warehouse_path, project.fold),
        "models": models, "skipped_models": skipped, "command": command,
        "per_query": per_query_rows,
    }
    report["comparisons"] = _comparisons(specs, per_query_rows, cfg, project.seed)
    out, md, plots = _write_report(ctx, cfg, report, specs, catalog)
    # The table itself is printed once: by `main` when evaluate runs alone, by the pipeline's closing summary.
    print(f"evaluate: report {out} (+ {md.name}, {', '.join(p.name for p in plots)}) in {time.time() - started:.0f}s")
    return report


def report_path(project, cfg: EvaluateConfig) -> Path:
    """Where the report goes: `evaluate.out`, else <warehouse>/evaluation/report_<split>.json."""
    out = Path(cfg.out) if cfg.out else project.outputs_path / "evaluation" / f"report_{cfg.split}.json"
    return out.expanduser().resolve()


def outcome(report: dict) -> str:
    """The pipeline's one-line account of a run."""
    return (f"{len(report['models'])} models on {report['inputs']['n_queries_evaluated']} {report['split']} queries, "
            f"{report['inputs']['n_labels']:,} labels")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = job_parser("annomine evaluate", __doc__)
    parser.add_argument("--model", action="append", default=[], help="a model spec (repeatable)")
    parser.add_argument("--models", help="comma-separated model specs, e.g. bm25,minilm,best; a dense spec + \"+bm25\" is a hybrid with BM25 (minilm+bm25)")
    parser.add_argument("--products", help="products file (product_id, title[, description])")
    parser.add_argument("--queries", help="queries file (query_id, query[, frequency])")
    parser.add_argument("--labels", help="labels file (query_id, product_id, grade[, variance])")
    parser.add_argument("--out", help="report JSON path (markdown and PNGs are written next to it)")
    parser.add_argument("--split", choices=SPLITS, help="labelled queries to use (annomine.splits.split_of)")
    parser.add_argument("--index", choices=("flat", "hnsw", "ivf"), help="FAISS index (default flat)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = parser.parse_args(argv)
    project, cfg = load(args, "evaluate", EvaluateConfig)
    cli_models = list(args.model) + [m for m in (args.models or "").split(",") if m.strip()]
    if cli_models:
        cfg.models = cli_models
    for name in ("products", "queries", "labels", "out", "split"):
        if getattr(args, name):
            setattr(cfg, name, getattr(args, name))
    if args.index:
        cfg.encode.index.kind = args.index
    if args.no_mlflow:
        cfg.mlflow = False
    cfg.validate()
    ctx = open_context(project)
    command = "annomine evaluate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = run(ctx, cfg, strict_models=bool(cli_models), command=command)
    print("\n" + "\n".join(report_lib.summary(report, report_path(project, cfg))), flush=True)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine evaluate", main))
