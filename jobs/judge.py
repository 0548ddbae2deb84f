"""Stage `judge`: train, calibrate and evaluate the relevance judge cascade.

    annomine judge train     [--conf F] [--queries F --labels F --products F]
    annomine judge calibrate [--conf F] [--judge PATH] [...same label files]
    annomine judge eval      --queries F --labels F --products F [--judge PATH] [--split dev|test|all]
    annomine judge pilot     [--conf F] [--judge PATH] [--pairs N]

`train` fine-tunes the tier-1 cross-encoder on the train queries (annomine.splits: dev and test queries are
never trained on; a query-disjoint calibration part of the train queries is held out). On the calibration
part it fits, in order: the stack (`model.stack`: logistic regression over the cross-encoder's grades and
cheap per-pair features, annomine/judges/stack.py), the decision rule and its cut-points on the expected
grade, and the per-class isotonic calibration and thresholds; with `refit_on_all` it then trains again on
train + calibration queries and keeps those fits. It reports tier-1 metrics on dev (and test, reported
only), saves everything under a new `<warehouse>/judges/<version>.<tag>/` (with per-pair predictions), points
`current.json` at it and logs params, metrics, confusion-matrix and calibration PNGs to MLflow. It also orders each dev/test query's labelled products by the judge's expected grade and by a zero-shot
bi-encoder (`ranking_baseline`, the retriever's start) and scores both orders with NDCG@10, paired
(annomine/judges/ranking.py): a judge that orders products no better than the retriever cannot teach it to.
`calibrate` (re)fits the calibration of every
enabled tier (the LLM tiers included) on the calibration split. `eval` grades the pairs of any
files in the CrowdFlower layout with the configured cascade: exact agreement, quadratic weighted kappa,
confusion matrix, escalation rate, the share settled per tier and the same ranking check for the first tier's
expected grade. Each action prints a line and writes its whole summary to `<warehouse>/runs/judge_<action>_summary.json`. `pilot` grades a stratified sample of the labelled mined candidates with the
cascade and says whether it is worth a full annotate run (annomine/judges/pilot.py), beside that run's forecast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from annomine.bounds import bounded
from annomine.config import ProjectConfig
from annomine.judges.cascade import CascadeConfig
from annomine.encoders import MINILM
from annomine.judges import lines
from annomine.judges.cross_encoder import TINY, CrossEncoderSettings
from annomine.run_summary import write_summary
from annomine.runtime import job_parser, load, setup_logging
from annomine.tracking import Tracker

log = logging.getLogger("annomine.judge")


@dataclass
class LabelFiles:
    queries: str
    labels: str
    products: str


@dataclass
class JudgeConfig:
    # Tier-1 training settings.
    model: CrossEncoderSettings = field(default_factory=CrossEncoderSettings)
    # Human labels: files in the CrowdFlower layout; empty = the human_labels/queries/products tables.
    labels: LabelFiles | None = None
    # Share of train queries held out (by query) for calibration and the decision rule.
    calibration_fraction: float = bounded(0.25, gt=0, lt=1)
    # Calibrated agreement a tier must reach on a class to settle a pair without escalating.
    target_agreement: float = bounded(0.9, gt=0, le=1)
    # LLM tiers are calibrated (and the combiner fitted) on at most this many calibration pairs: those tier 1 is
    # least sure of, as those are what escalates (None: every calibration pair).
    llm_calibration_pairs: int | None = bounded(300, ge=1)
    # The combination of the tiers' distributions is kept only when its out-of-fold QWK beats tier 1 alone by this.
    combiner_min_gain: float = 0.01
    # After the decision rule, cut-points and calibration are fitted on the calibration queries (with a model
    # trained on the train queries), train once more on train + calibration queries and keep those fits:
    # every open training query teaches the final model (twice the training time).
    refit_on_all: bool = False
    # After training, each dev/test query's labelled products are ordered by the judge's expected grade and by this
    # zero-shot bi-encoder's cosine (the retriever's start; empty: skipped), and both orders are scored with NDCG@10
    # against the human grades (annomine/judges/ranking.py): a judge that orders no better cannot teach the retriever.
    ranking_baseline: str | None = "minilm"
    # The cascade used by `calibrate` and `eval` (tiers 2 and 3, loopback server, concurrency).
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    # The spending rule of `calibrate` and `eval` (annomine/judges/spending.py), as in `annotate`: `auto` sends no pair
    # to an LLM tier when calibration kept no combination with it (`always`: send anyway); at most `llm_budget` LLM
    # calls (eval; `--llm-budget` overrides) and `max_cost` USD per command (priced tiers).
    escalate: str = "auto"
    llm_budget: int | None = bounded(None, ge=0)
    max_cost: float | None = bounded(None, ge=0)
    # `judge pilot`: labelled mined candidates graded, a sample stratified by level, segment and channels.
    pilot_pairs: int = bounded(300, ge=1)
    # `annomine pipeline` runs the pilot before annotate and shows its verdict in the closing summary. A report, not a
    # gate: annotate grades whatever it says (a judge that orders labelled products worse than the zero-shot encoder
    # can still teach a retriever words the encoder does not know).
    pilot_in_pipeline: bool = True
    log_mlflow: bool = True

    def validate(self) -> None:
        from annomine.judges.costs import price
        from annomine.judges.spending import check_escalate

        check_escalate(self.escalate)
        for name in ("tier2", "tier3"):
            tier = getattr(self.cascade, name)
            if self.max_cost is not None and tier is not None and price(tier) is None:
                raise ValueError(f"max_cost needs a price for cascade.{name} ({tier.model}): set "
                                 f"cascade.{name}.input_usd_per_mtok and output_usd_per_mtok")
        if self.ranking_baseline and self.ranking_baseline not in (MINILM, TINY) and not Path(self.ranking_baseline).exists():
            raise ValueError(f"ranking_baseline: no model folder {self.ranking_baseline!r} ('{MINILM}', '{TINY}' or a local "
                             "Hugging Face folder; empty: skip the check)")


CONFIG_CLASS = JudgeConfig


def grades_of(project: ProjectConfig) -> list[int]:
    return list(range(project.min_grade, project.max_grade + 1))


def _labelled_pairs(project: ProjectConfig, cfg: JudgeConfig, files: LabelFiles | None):
    from annomine.judges.data import load_pairs_from_files, load_pairs_from_tables

    files = files or cfg.labels
    if files:
        return load_pairs_from_files(files.queries, files.labels, files.products, project.min_grade, project.max_grade)
    from annomine.runtime import open_context

    return load_pairs_from_tables(open_context(project).tables)


def _confusion_png(metrics: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(metrics["confusion_matrix"]["rows_truth_cols_pred"])
    grades = metrics["confusion_matrix"]["grades"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black")
    ax.set_xticks(range(len(grades)), grades)
    ax.set_yticks(range(len(grades)), grades)
    ax.set_xlabel("judge grade")
    ax.set_ylabel("human grade")
    ax.set_title(f"{title}\nagreement {metrics['exact_agreement']:.3f}, QWK {metrics['quadratic_weighted_kappa']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _calibration_png(conf: np.ndarray, raw_conf: np.ndarray, correct: np.ndarray, expected: np.ndarray, truth: np.ndarray,
                     cutpoints: list[float] | None, path: Path, title: str, bins: int = 10) -> Path:
    """Two panels: calibrated (and raw) confidence against observed agreement with the human grade, per
    confidence bin; and the expected grade against the mean human grade, per expected-grade bin, with the
    cut-points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for values, label, style in ((conf, "calibrated", "o-"), (raw_conf, "raw (probability of the grade)", "s--")):
        idx = np.clip(np.digitize(values, edges) - 1, 0, bins - 1)
        xs, ys, ns = [], [], []
        for b in range(bins):
            m = idx == b
            if m.any():
                xs.append(float(values[m].mean()))
                ys.append(float(correct[m].mean()))
                ns.append(int(m.sum()))
        ax1.plot(xs, ys, style, label=label, markersize=4)
        if label == "calibrated":
            for x, y, n in zip(xs, ys, ns):
                ax1.annotate(str(n), (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
    ax1.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax1.set_xlabel("tier-1 confidence")
    ax1.set_ylabel("agreement with the human grade")
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=7, loc="upper left")
    ax1.set_title("reliability (pairs per bin)", fontsize=9)
    qs = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(qs, expected, side="right") - 1, 0, max(len(qs) - 2, 0))
    xs = [float(expected[idx == b].mean()) for b in np.unique(idx)]
    ys = [float(truth[idx == b].mean()) for b in np.unique(idx)]
    ax2.plot(xs, ys, "o-", markersize=4)
    lo, hi = float(min(truth.min(), expected.min())), float(max(truth.max(), expected.max()))
    ax2.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    for c in cutpoints or []:
        ax2.axvline(c, color="tab:red", lw=0.8, ls=":")
    ax2.set_xlabel("expected grade (dotted: cut-points)")
    ax2.set_ylabel("mean human grade")
    ax2.set_title("expected grade, per decile", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _predictions_frame(df, probs: np.ndarray, pred: np.ndarray, grades: list[int]):
    out = df[["query_id", "product_id", "grade"]].copy()
    for j, g in enumerate(grades):
        out[f"p_{g}"] = probs[:, j]
    out["expected"] = probs @ np.asarray(grades, dtype=float)
    out["pred"] = pred
    return out


def _track(project: ProjectConfig, run_name: str, params: dict, metrics: dict, artifacts: list[Path]) -> None:
    with Tracker(project).run(run_name, params) as run:
        run.metrics(metrics)
        run.artifacts(artifacts)


def _ranking_baseline(cfg: JudgeConfig, judge_model=None):
    """The bi-encoder of the ranking check: the judge's own cosine feature when it is the same model (its cache
    already holds the pairs' embeddings), else loaded; None when the check is off."""
    if not cfg.ranking_baseline:
        return None
    from annomine.judges.stack import BIENCODER_MAX_LENGTH, BiEncoder

    own = getattr(judge_model, "biencoder", None)
    if own is not None and (own.base_model, own.max_length) == (cfg.ranking_baseline, BIENCODER_MAX_LENGTH):
        return own
    return BiEncoder(cfg.ranking_baseline)


def _ranking(part, expected: np.ndarray, baseline, grades: list[int], seed: int) -> dict:
    """The judge's order of each query's labelled products against the baseline's (annomine/judges/ranking.py)."""
    from annomine.evaluation.metrics import LENGTH_RULE, segments_by_length
    from annomine.judges.ranking import ranking_headroom

    cosine = baseline.cosine(part["query"].astype(str).tolist(), part["text"].astype(str).tolist())
    queries = part.groupby(part["query_id"].astype(str))["query"].first()
    result = ranking_headroom(part, expected, cosine, min(grades), max(grades), seed=seed, segments=segments_by_length(queries))
    result["baseline"] = baseline.base_model
    result["segment_rule"] = LENGTH_RULE
    log.info("judge ranking: NDCG@10 of each query's labelled products ordered by the judge %.4f, by %s %.4f "
             "(paired %+.4f [%+.4f, %+.4f], %d queries)", result["judge_ndcg@10"]["mean"] or 0.0, baseline.base_model,
             result["baseline_ndcg@10"]["mean"] or 0.0, result["diff"]["mean"] or 0.0, result["diff"]["ci_low"] or 0.0,
             result["diff"]["ci_high"] or 0.0, result["n_queries"])
    return result


def _split_pairs(pairs, cfg: JudgeConfig) -> tuple:
    """The train, calibration and dev pairs (raising when train or calibration is empty), logged."""
    tr, cal, dev = (pairs[pairs.split == s].reset_index(drop=True) for s in ("train", "calibration", "dev"))
    if tr.empty or cal.empty:
        raise ValueError(f"not enough labelled queries to train and calibrate: {len(tr)} train, {len(cal)} calibration pairs")
    log.info("judge train: %d train pairs (%d queries), %d calibration (%d), %d dev (%d)%s", len(tr), tr.query_id.nunique(),
             len(cal), cal.query_id.nunique(), len(dev), dev.query_id.nunique(),
             "; refit on train + calibration" if cfg.refit_on_all else "")
    return tr, cal, dev


def _judge_version(tr, cal, cfg: JudgeConfig, grades: list[int]) -> str:
    """The version id of the judge trained on these pairs with these settings."""
    from annomine.judges.cross_encoder import version_id

    keys = list(zip(tr.query_id, tr.product_id, tr.grade, tr.text, tr["query"]))
    if cfg.refit_on_all:
        keys += [("refit",) + k for k in zip(cal.query_id, cal.product_id, cal.grade, cal.text, cal["query"])]
    return version_id(cfg.model, grades, keys)


def _labelled_vectors(project: ProjectConfig, cfg: JudgeConfig, product_ids) -> dict:
    """{product text: vector} of the labelled products (`product_ids`) that the ANN channel already computed for the
    stack's bi-encoder (`product_embeddings`, the same model and token limit), so their texts are not encoded again;
    empty when there are none."""
    from annomine.judges.stack import BIENCODER_MAX_LENGTH, shared_vector_key
    from annomine.retrievers.embeddings import vectors_by_text
    from annomine.runtime import open_context

    key = shared_vector_key({"base_model": cfg.model.stack_biencoder, "max_length": BIENCODER_MAX_LENGTH}) if cfg.model.stack else None
    return vectors_by_text(open_context(project), key, list(product_ids)) if key else {}


def _fit_on_calibration(model, history: dict, cal, cfg: JudgeConfig, grades: list[int], known_vectors: dict | None = None) -> tuple:
    """The calibration part's probabilities and decisions and the tier-1 calibrator, after fitting the stack and the
    decision rule on it (history gets their fits), and the fitted judge's own distribution on these pairs.
    `known_vectors`: the bi-encoder's vectors already computed (`_labelled_vectors`)."""
    from annomine.judges.calibration import fit_calibrator
    from annomine.judges.cross_encoder import attach_stack, select_decision

    cal_probs = final = model.predict_proba(cal["query"].tolist(), cal["text"].tolist(), progress=True)
    if cfg.model.stack:
        # the stack is fitted on the calibration queries; what follows sees its out-of-fold distribution there
        weights = 1.0 / (1.0 + cal["variance"].astype(float).fillna(0.0).to_numpy()) if cfg.model.weight_by_variance else None
        fitted = attach_stack(model, cal, cal_probs, cfg.model, weights, known_vectors)
        cal_probs, final = fitted.pop("oof_probs"), fitted.pop("fitted_probs")
        history["stack"] = fitted
    # decision rule and cut-points chosen on the calibration queries (never on dev)
    history.update(select_decision(model, cal_probs, cal["grade"], cal["query_id"], cfg.model.decision,
                                   cfg.model.cutpoint_objective))
    cal_pred = model.decide(cal_probs)
    cal_conf = cal_probs[np.arange(len(cal_pred)), [grades.index(int(g)) for g in cal_pred]]
    calibrator = fit_calibrator(cal_pred, cal_conf, cal["grade"], grades, cfg.target_agreement)
    return cal_probs, cal_pred, calibrator, final


def _keep_for_rank(project: ProjectConfig, folder: Path, graded: list) -> None:
    """What the published judge gave the labelled pairs it graded here ((pairs, probabilities) in `graded`), kept in
    the tier-1 score cache that the rank stage and `best+ce` read (annomine/ranking/tier1.py), so they are not
    graded again there."""
    from annomine.ranking.tier1 import Tier1Scores, cache_folder

    scores = Tier1Scores(folder, cache_folder(project.warehouse_path / "cache"))
    try:
        added = sum(scores.remember(part["query"].tolist(), part["text"].tolist(), probs) for part, probs in graded)
    except (OSError, ValueError) as exc:  # an unwritable or damaged cache: the rank stage grades these pairs itself
        log.warning("judge: tier-1 distributions not kept for the rank stage (%s: %s)", scores.file, exc)
        return
    log.info("judge: %d labelled pairs' tier-1 distributions kept for the rank stage (%s)", added, scores.file)


def _refit_on_all(model, history: dict, tr, cal, cfg: JudgeConfig, grades: list[int]):
    """The model trained again on train + calibration with the first model's fits (history gets the refit's)."""
    import pandas as pd

    from annomine.judges.cross_encoder import train_cross_encoder

    final, refit = train_cross_encoder(pd.concat([tr, cal], ignore_index=True), grades, cfg.model)
    final.version, final.decision, final.cutpoints = model.version, model.decision, model.cutpoints
    final.stack, final.biencoder = model.stack, model.biencoder
    history["refit"] = {k: refit[k] for k in ("epochs", "train_pairs", "train_seconds", "train_pairs_per_s")}
    history["first_train_seconds"] = history["train_seconds"]
    history["train_seconds"] += refit["train_seconds"]
    return final


def _evaluate_part(model, calibrator, part, name: str, version: str, baseline, grades: list[int], seed: int,
                   folder: Path, artifacts: list[Path]) -> dict:
    """The tier-1 metrics on one reported split; its PNGs and predictions are written to folder and added to artifacts."""
    from annomine.judges.data import grading_metrics

    started = time.time()
    probs = model.predict_proba(part["query"].tolist(), part["text"].tolist(), progress=True)
    seconds = time.time() - started
    pred = model.decide(probs)
    raw = probs[np.arange(len(pred)), [grades.index(int(g)) for g in pred]]
    conf = calibrator.calibrate(pred, raw)
    part_metrics = grading_metrics(part["grade"], pred, grades)
    part_metrics["would_escalate_rate"] = float(1.0 - calibrator.is_sure(pred, conf).mean())
    part_metrics["pairs_per_s"] = len(part) / max(seconds, 1e-9)
    part_metrics["n_queries"] = int(part.query_id.nunique())
    if baseline is not None:
        part_metrics["ranking"] = _ranking(part, probs @ np.asarray(grades, float), baseline, grades, seed)
    artifacts.append(_confusion_png(part_metrics, folder / f"confusion_{name}_tier1.png", f"tier 1 {version} on {name}"))
    truth = part["grade"].to_numpy().astype(int)
    artifacts.append(_calibration_png(conf, raw, (pred == truth).astype(float), probs @ np.asarray(grades, float), truth,
                                      model.cutpoints, folder / f"calibration_{name}_tier1.png",
                                      f"tier 1 {version} on {name} (decision: {model.decision})"))
    _predictions_frame(part, probs, pred, grades).to_parquet(folder / f"predictions_{name}.parquet")
    artifacts.append(folder / f"predictions_{name}.parquet")
    return part_metrics, probs


def _flat_train_metrics(metrics: dict, history: dict, calibrator) -> dict:
    """The numeric figures of a train run, flattened for MLflow."""
    flat = {"train_seconds": history["train_seconds"], "train_pairs_per_s": history["train_pairs_per_s"],
            "calibration_sure_share": calibrator.stats["sure_share"]}
    for name in ("dev", "test"):
        flat.update({f"{name}_{k}": v for k, v in metrics.get(f"{name}_tier1", {}).items() if isinstance(v, (int, float))})
        ranking = metrics.get(f"{name}_tier1", {}).get("ranking")
        if ranking:
            flat.update({f"{name}_ranking_ndcg10_judge": ranking["judge_ndcg@10"]["mean"],
                         f"{name}_ranking_ndcg10_baseline": ranking["baseline_ndcg@10"]["mean"],
                         f"{name}_ranking_ndcg10_diff": ranking["diff"]["mean"]})
    for rule, m in history.get("validation", {}).items():
        flat.update({f"calibration_{rule}_{k}": m[k] for k in ("quadratic_weighted_kappa", "exact_agreement")})
    for e in history["epochs"]:
        flat[f"loss_epoch_{e['epoch']}"] = e["loss"]
    return flat


def train(project: ProjectConfig, cfg: JudgeConfig, files: LabelFiles | None = None, set_current: bool = True) -> dict:
    from annomine.judges.cross_encoder import train_cross_encoder
    from annomine.judges.data import assign_splits
    from annomine.judges.store import publish_judge, staging_folder
    from annomine.judges.store import set_current as point_current

    grades = grades_of(project)
    pairs = _labelled_pairs(project, cfg, files)
    pairs["split"] = assign_splits(pairs, cfg.calibration_fraction, project.seed, project.fold, project.rotation)
    tr, cal, dev = _split_pairs(pairs, cfg)
    version = _judge_version(tr, cal, cfg, grades)
    model, history = train_cross_encoder(tr, grades, cfg.model)
    model.version = version
    known = _labelled_vectors(project, cfg, pairs["product_id"].unique()) if not (files or cfg.labels) else None
    cal_probs, cal_pred, calibrator, cal_final = _fit_on_calibration(model, history, cal, cfg, grades, known)
    graded = [(cal, cal_final)]  # the labelled pairs graded by the published judge, with its distributions
    if cfg.refit_on_all:
        model, graded = _refit_on_all(model, history, tr, cal, cfg, grades), []
    metrics: dict = {"version": version, "fold": project.fold, "rotation": project.rotation, "history": history, "calibration": calibrator.stats,
                     "splits": {s: {"pairs": int((pairs.split == s).sum()), "queries": int(pairs[pairs.split == s].query_id.nunique())}
                                for s in ("train", "calibration", "dev")},
                     "trained_on": "train + calibration" if cfg.refit_on_all else "train"}
    # written whole under judges/_staging, then moved into judges/ and made current (annomine.judges.store)
    with staging_folder(project.warehouse_path, version) as folder:
        model.meta = {"settings": asdict(cfg.model), "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "refit_on_all": cfg.refit_on_all}
        model.save(folder)
        calibrator.save(folder / "calibration_tier1.json")
        # the calibration split's grades come from the model trained without it (the one the fits saw)
        _predictions_frame(cal, cal_probs, cal_pred, grades).to_parquet(folder / "predictions_calibration.parquet")
        artifacts = [folder / "predictions_calibration.parquet"]
        baseline = _ranking_baseline(cfg, model)
        # dev: the judge's validation figures; test (when the split exists): reported only, nothing is chosen on it
        for name, part in (("dev", dev), ("test", pairs[pairs.split == "test"].reset_index(drop=True))):
            if len(part):
                metrics[f"{name}_tier1"], probs = _evaluate_part(model, calibrator, part, name, version, baseline,
                                                                 grades, project.seed, folder, artifacts)
                graded.append((part, probs))
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        artifacts.append(folder / "metrics.json")
        published = publish_judge(project.warehouse_path, folder)
    artifacts = [published / a.relative_to(folder) for a in artifacts]
    folder = published
    if set_current:
        point_current(project.warehouse_path, version, folder)
    _keep_for_rank(project, folder, graded)
    if cfg.log_mlflow:
        _track(project, f"judge-train-{version}", dict(asdict(cfg.model), version=version, decision=model.decision,
                                                      cutpoints=model.cutpoints, refit_on_all=cfg.refit_on_all,
                                                      target_agreement=cfg.target_agreement),
               _flat_train_metrics(metrics, history, calibrator), artifacts)
    metrics["path"], metrics["decision"], metrics["cutpoints"] = str(folder), model.decision, model.cutpoints
    report("judge_train", project, metrics, lines.train_line(metrics))
    return metrics


def report(name: str, project: ProjectConfig, summary: dict, line: str) -> None:
    """The command's line for a person on stdout; its whole summary in `<outputs>/runs/<name>_summary.json`."""
    path = write_summary(project, name, summary)
    print(f"{line} (summary: {path})", flush=True)


@contextlib.contextmanager
def response_cache(project: ProjectConfig, cascade, report: dict, command: str):
    """The LLM tiers answer what `llm_responses` holds without a request; what they pay for is stored when the block
    ends (also when it fails part-way), with the run's `llm_ledger` rows. `report` gets the answers loaded and stored,
    and each tier's hits, requests, tokens and money."""
    if not cascade.llm_tier_names:
        yield None
        return
    import uuid

    from annomine.judges.costs import spend, write_ledger
    from annomine.judges.response_cache import load_answers, store_answered
    from annomine.runtime import open_context

    tables = open_context(project).tables
    report["loaded"] = load_answers(tables, cascade.tiers)
    try:
        yield tables
    finally:
        report["stored"] = store_answered(tables, cascade.tiers)
        usage = {t.name: dict(t.cache_counts) for t in cascade.tiers if t.name in cascade.llm_tier_names}
        report["per_tier"] = {n: {"hits": u["hits"], "misses": u["misses"]} for n, u in usage.items()}
        report["cost"] = spend(usage, cascade.tiers)
        report["run_id"] = uuid.uuid4().hex
        write_ledger(tables, report["run_id"], command, cascade.version, report["cost"])


def plan_eval(cascade, tables, pdf, cfg: JudgeConfig, llm_budget: int | None, asked: int = 0, command: str = "judge eval"):
    """The spending rule before eval's first request: the escalation rule, the forecast printed, the call budget
    (`llm_budget`, and what `max_cost` affords), local servers started only for a request. (forecast, budget)."""
    from annomine.judges.costs import history
    from annomine.judges.forecast import forecast, tier_shares
    from annomine.judges.spending import announce, call_budget, needs_requests, skip_reason

    if tables is None:
        return None, llm_budget
    if not hasattr(cascade.tiers[0], "cfg"):
        cascade.tiers[0].memo = {}  # the forecast's tier-1 grades are the run's
    skipped = skip_reason(cascade, cfg.escalate)
    fc = forecast(cascade, pdf, history(tables, cascade.tiers), tier_shares(tables, cascade.llm_tier_names),
                  skipped is None, llm_budget, cfg.max_cost)
    if skipped:
        fc["skipped"] = skipped
    announce(command, fc)
    if needs_requests(fc) or asked:
        cascade.start_local_servers()
    return fc, 0 if skipped else call_budget(fc, llm_budget, cfg.max_cost)


def plan_calibration(cascade, tables, cal, cfg: JudgeConfig, report: dict | None = None) -> int | None:
    """The LLM calibration pairs after the forecast (printed) and `max_cost`; local servers started only for a
    request. The LLM tiers grade the pairs tier 1 is least sure of, so the forecast scales the average pair."""
    from annomine.judges.costs import history
    from annomine.judges.forecast import forecast
    from annomine.judges.spending import announce, needs_requests

    if tables is None:
        return cfg.llm_calibration_pairs
    n = len(cal)
    k = n if cfg.llm_calibration_pairs is None else min(n, cfg.llm_calibration_pairs)
    fc = forecast(cascade, cal[["query", "text"]], history(tables, cascade.tiers), {}, True, first_tier_done=True)
    scale = k / max(1, n)  # the forecast covers all n calibration pairs (duplicates share a request)
    for t in fc["tiers"].values():
        for key in ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "usd", "usd_if_batch"):
            t[key] = None if t[key] is None else round(t[key] * scale, 6)
    fc["usd"] = None if fc["usd"] is None else round(fc["usd"] * scale, 6)
    fc["escalate"] = k
    if cfg.max_cost is not None and fc["usd"] and fc["usd"] > cfg.max_cost:
        k = int(k * cfg.max_cost / fc["usd"])
        fc["llm_calibration_pairs_under_max_cost"] = k
    announce("judge calibrate", fc)
    if report is not None:
        report["forecast"] = fc
    if needs_requests(fc) and k > 0:
        cascade.start_local_servers()
    return k


def calibrate(project: ProjectConfig, cfg: JudgeConfig, files: LabelFiles | None = None, judge: str | None = None,
              only: list[str] | None = None) -> dict:
    """Re-fit tier calibrations on the calibration split (tier 1 and every enabled LLM tier)."""
    from annomine.judges.cascade import Cascade, calibrate_cascade
    from annomine.judges.data import assign_splits
    from annomine.judges.store import resolve_judge

    grades = grades_of(project)
    pairs = _labelled_pairs(project, cfg, files)
    pairs["split"] = assign_splits(pairs, cfg.calibration_fraction, project.seed, project.fold, project.rotation)
    cal = pairs[pairs.split == "calibration"].reset_index(drop=True)
    folder = resolve_judge(project.warehouse_path, judge or cfg.cascade.judge) if cfg.cascade.tier1 else None
    cache: dict = {}
    with (Cascade.open(cfg.cascade, folder, grades, project.warehouse_path, start_local=False) as cascade,
          response_cache(project, cascade, cache, "judge calibrate") as tables):
        planned: dict = {}
        llm_pairs = plan_calibration(cascade, tables, cal, cfg, planned)
        stats = calibrate_cascade(cascade, cal, cfg.target_agreement, only, llm_pairs=llm_pairs,
                                  combine=cfg.cascade.combine, min_gain=cfg.combiner_min_gain)
    if planned:
        stats["forecast"] = planned["forecast"]
    if cache:
        stats["llm_cache"] = cache
    report("judge_calibrate", project, stats, lines.calibrate_line(stats))
    return stats


def _tiers_alone(cascade, pairs, n: int, grades: list[int], seed: int) -> dict:
    """Each tier alone on `n` seeded pairs: its agreement, QWK, speed and confidence sources."""
    from annomine.judges.data import grading_metrics

    sample = pairs.sample(n=min(n, len(pairs)), random_state=seed).reset_index(drop=True)
    qt = list(zip(sample["query"].astype(str), sample["text"].astype(str)))
    alone = {}
    for tier in cascade.tiers:
        t0 = time.time()
        res = tier.grade_many(qt, cascade.concurrency)
        m = grading_metrics(sample["grade"].to_numpy(), [r.grade for r in res], grades)
        alone[tier.name] = {"pairs": len(qt), "exact_agreement": m["exact_agreement"],
                            "quadratic_weighted_kappa": m["quadratic_weighted_kappa"], "n_graded": m["n_graded"],
                            "pairs_per_s": round(len(qt) / max(time.time() - t0, 1e-9), 2),
                            "confidence_sources": dict(Counter(str(r.confidence_source) for r in res))}
    return alone


def evaluate(project: ProjectConfig, cfg: JudgeConfig, files: LabelFiles | None, judge: str | None = None,
             split: str = "all", llm_alone_pairs: int = 0, llm_budget: int | None = None) -> dict:
    """Grade the split's labelled pairs with the cascade: its metrics, the first tier alone, the share decided per
    tier and the LLM calls; with `llm_alone_pairs`, each LLM tier alone on that many (seeded) pairs too, next to the
    first tier on the same pairs. `llm_budget`: at most that many LLM calls in the cascade pass, on the pairs the
    first tier is least sure of (the others keep its grade, as in `annotate.llm_budget`)."""
    from annomine.judges.cascade import Cascade, cascade_metrics
    from annomine.judges.data import assign_splits
    from annomine.judges.store import resolve_judge

    grades = grades_of(project)
    pairs = _labelled_pairs(project, cfg, files)
    if split != "all":
        pairs = pairs[assign_splits(pairs, cfg.calibration_fraction, project.seed, project.fold, project.rotation) == split].reset_index(drop=True)
    if pairs.empty:
        raise ValueError(f"no labelled pairs to evaluate (split={split})")
    folder = resolve_judge(project.warehouse_path, judge or cfg.cascade.judge) if cfg.cascade.tier1 else None
    started = time.time()
    cache: dict = {}
    llm_budget = cfg.llm_budget if llm_budget is None else llm_budget
    with (Cascade.open(cfg.cascade, folder, grades, project.warehouse_path, start_local=False) as cascade,
          response_cache(project, cascade, cache, "judge eval") as tables):
        fc, budget = plan_eval(cascade, tables, pairs, cfg, llm_budget, llm_alone_pairs)
        graded = cascade.grade_frame(pairs[["query_id", "query", "product_id", "text"]], progress=True, llm_budget=budget)
        result = cascade_metrics(pairs["grade"].to_numpy(), graded, grades)
        result["judge_version"] = cascade.version
        result["tiers"] = cascade.tier_names
        result["llm_budget"] = llm_budget
        if fc is not None:
            result["forecast"] = fc
        result["escalated_pairs_decided_by"] = cascade.escalated_pairs_decided_by
        result["seconds"] = round(time.time() - started, 2)
        first = cascade.tier_names[0] if cascade.tier_names else None
        expected = [json.loads(js).get(first, {}).get("expected_grade") for js in graded["tier_outputs"]]
        from annomine.judges.cross_encoder import load_cached

        # tier 1's model is the one the cascade just graded with (one per folder per process)
        baseline = _ranking_baseline(cfg, load_cached(folder) if folder is not None else None)
        if baseline is not None and expected and all(e is not None for e in expected):
            # the first tier's expected grade: the finest order of each query's products the judge has
            result["ranking"] = _ranking(pairs, np.asarray(expected, float), baseline, grades, project.seed)
            result["ranking"]["judge_score"] = f"{first} expected grade"
        elif baseline is not None:
            missing = sum(e is None for e in expected)
            log.info("judge eval: no ranking check (%d of %d pairs have no %s expected grade)", missing, len(expected), first)
        if llm_alone_pairs and cascade.llm_tier_names:
            result["tiers_alone_on_sample"] = _tiers_alone(cascade, pairs, llm_alone_pairs, grades, project.seed)
    if cache:
        result["llm_cache"] = cache
    result["split"] = split
    result["n_queries"] = int(pairs.query_id.nunique())
    result["pairs_per_s"] = round(len(pairs) / max(result["seconds"], 1e-9), 1)  # the cascade's own pass
    report("judge_eval", project, result, lines.eval_line(result))
    return result


def labelled_candidates(tables):
    """The mined candidates humans graded: query, text, human grade, level, segment and the channels that found them."""
    from annomine.judges.pilot import channels_of

    mined = tables.read("mined_candidates").drop("query")
    df = (mined.join(tables.read("human_labels").select("query_id", "product_id", "grade"), ["query_id", "product_id"])
          .join(tables.read("queries").select("query_id", "query"), "query_id")
          .join(tables.read("products").select("product_id", "text"), "product_id").toPandas())
    if df.empty:
        from annomine.errors import MissingInputError

        raise MissingInputError("judge pilot: no mined candidate (table mined_candidates) has a human grade (table "
                                "human_labels): ingest labels for mined queries, or mine the labelled queries")
    df["grade"] = df["grade"].astype(int)
    df["level"] = df["level"].fillna(-1).astype(int)
    df["segment"] = df["segment"].fillna("unknown").astype(str)
    df["channels"] = channels_of(df)
    return df.sort_values(["query_id", "product_id"]).reset_index(drop=True)


def pilot_population(project: ProjectConfig, cfg: JudgeConfig) -> tuple:
    """The labelled mined candidates a pilot may grade (`annomine.judges.pilot.unseen_by_teacher`), the judge splits
    their queries come from, and how many mined candidates a full annotate run grades."""
    from annomine.judges.data import assign_splits
    from annomine.judges.pilot import unseen_by_teacher
    from annomine.runtime import open_context

    tables = open_context(project).tables
    labelled = labelled_candidates(tables)
    splits = assign_splits(labelled, cfg.calibration_fraction, project.seed, project.fold, project.rotation)
    population = unseen_by_teacher(labelled, splits, learned_tier=cfg.cascade.tier1)
    if population.empty:
        from annomine.errors import MissingInputError

        raise MissingInputError("judge pilot: no labelled mined candidate of a query the teacher never learned from "
                                "(the judge's calibration and dev queries; test queries are for reporting only): "
                                "label more queries")
    kept = sorted(set(splits[labelled["query_id"].isin(set(population["query_id"])).to_numpy()]))
    return population, kept, int(tables.read("mined_candidates").count())


def pilot(project: ProjectConfig, cfg: JudgeConfig, judge: str | None = None, n_pairs: int | None = None) -> dict:
    """Grade a stratified sample of the labelled mined candidates with the configured cascade: agreement with the
    humans, the ranking check against the zero-shot encoder, a verdict, and the full annotate run's forecast."""
    from annomine.judges.cascade import Cascade, cascade_metrics
    from annomine.judges.pilot import STRATA, scale_forecast, stratified_sample, teacher_scores, verdict
    from annomine.judges.store import resolve_judge

    if not cfg.ranking_baseline:
        from annomine.config import ConfigError

        raise ConfigError("judge pilot needs judge.ranking_baseline: the zero-shot encoder whose order the teacher must beat")
    grades = grades_of(project)
    population, kept_splits, mined = pilot_population(project, cfg)
    sample = stratified_sample(population, n_pairs or cfg.pilot_pairs, project.seed)
    folder = resolve_judge(project.warehouse_path, judge or cfg.cascade.judge) if cfg.cascade.tier1 else None
    cache: dict = {}
    with (Cascade.open(cfg.cascade, folder, grades, project.warehouse_path, start_local=False) as cascade,
          response_cache(project, cascade, cache, "judge pilot") as tables):
        fc, budget = plan_eval(cascade, tables, sample, cfg, cfg.llm_budget, command="judge pilot")
        graded = cascade.grade_frame(sample[["query_id", "query", "product_id", "text"]], progress=True, llm_budget=budget)
        metrics = cascade_metrics(sample["grade"].to_numpy(), graded, grades)
        tiers = cascade.tier_names
    scores = teacher_scores(graded)
    ok = ~np.isnan(scores)
    ranking = _ranking(sample[ok].reset_index(drop=True), scores[ok], _ranking_baseline(cfg), grades, project.seed)
    result = {"sample": {"pairs": len(sample), "queries": int(sample.query_id.nunique()), "population_pairs": len(population),
                         "query_splits": kept_splits, "mined_candidates": mined,
                         "strata": sample.groupby(STRATA).size().rename("pairs").reset_index().to_dict("records")},
              "tiers": tiers, "agreement": {k: metrics[k] for k in ("exact_agreement", "quadratic_weighted_kappa", "n_graded",
                                                                    "escalation_rate", "first_tier_alone", "llm_calls")
                                            if k in metrics},
              "ranking": ranking, "verdict": verdict(ranking),
              "full_run_forecast": scale_forecast(fc, mined / len(sample)) if fc else None, "llm_cache": cache}
    full = result["full_run_forecast"]
    report("judge_pilot", project, result, lines.pilot_line(result) + "; full run: "
           + (f"{full['escalate']} pairs to escalate, {sum(t['requests'] for t in full['tiers'].values()):.0f} requests, "
              f"USD {full['usd']}" if full else "no LLM tier"))
    return result


def pilot_step(project: ProjectConfig, cfg: JudgeConfig) -> dict | None:
    """The pipeline's teacher pilot (before annotate): its result, or None with one line saying why it did not run."""
    from annomine.config import ConfigError
    from annomine.errors import MissingInputError

    try:
        return pilot(project, cfg)
    except (MissingInputError, ConfigError) as exc:
        write_summary(project, "judge_pilot", {"not_run": str(exc)})
        print(f"judge pilot: not run: {exc}", flush=True)
        return None


def run(ctx, cfg: JudgeConfig) -> dict:
    """Pipeline stage: train (and calibrate) the tier-1 judge on the ingested human labels, then
    calibrate every enabled LLM tier on the same calibration queries."""
    metrics = train(ctx.project, cfg)
    llm_tiers = [name for name in ("tier2", "tier3") if getattr(cfg.cascade, name) is not None]
    if llm_tiers:
        metrics["llm_calibration"] = calibrate(ctx.project, cfg, only=llm_tiers)
    return metrics


def outcome(metrics: dict) -> str:
    """The pipeline's one-line account of a run: the tier-1 judge's dev agreement and what calibration kept."""
    line = f"tier 1 {metrics.get('version')}: dev " + lines.agreement(metrics.get("dev_tier1"))
    if metrics.get("llm_calibration"):
        line += "; " + lines.combiner_outcome(metrics["llm_calibration"])
    return line


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    for noisy in ("httpx2", "httpcore", "openai"):  # one line per LLM request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = job_parser("annomine judge", __doc__)
    parser.add_argument("action", choices=["train", "eval", "calibrate", "pilot"])
    parser.add_argument("--queries", help="queries file (CrowdFlower layout)")
    parser.add_argument("--labels", help="human labels file (query_id, product_id, grade[, variance])")
    parser.add_argument("--products", help="products file (product_id, title[, description])")
    parser.add_argument("--judge", help="judge folder or version (default: <warehouse>/judges/current.json)")
    parser.add_argument("--split", default="all", choices=["all", "dev", "test", "train", "calibration"],
                        help="eval: grade only this split of the labelled queries (default: all)")
    parser.add_argument("--tier1-only", action="store_true", help="eval/calibrate with tier 1 alone (tiers 2-3 disabled)")
    parser.add_argument("--tiers", help="calibrate: only these tiers, e.g. tier2,tier3 (default: every enabled tier)")
    parser.add_argument("--llm-alone", type=int, default=0, metavar="N",
                        help="eval: also grade N (seeded) pairs with each tier alone (the LLM tiers' own quality)")
    parser.add_argument("--llm-budget", type=int, default=None, metavar="N",
                        help="eval: at most N LLM calls in the cascade, on the pairs tier 1 is least sure of")
    parser.add_argument("--pairs", type=int, default=None, metavar="N",
                        help="pilot: grade a stratified sample of N labelled mined candidates (default judge.pilot_pairs)")
    args = parser.parse_args(argv)
    project, cfg = load(args, "judge", JudgeConfig)
    given = [args.queries, args.labels, args.products]
    if any(given) and not all(given):
        parser.error("--queries, --labels and --products go together")
    files = LabelFiles(args.queries, args.labels, args.products) if all(given) else None
    if args.tier1_only:
        cfg.cascade.tier2 = cfg.cascade.tier3 = None
    if args.action == "train":
        train(project, cfg, files)
    elif args.action == "pilot":
        pilot(project, cfg, args.judge, args.pairs)
    elif args.action == "calibrate":
        calibrate(project, cfg, files, args.judge, args.tiers.split(",") if args.tiers else None)
    else:
        evaluate(project, cfg, files, args.judge, args.split, args.llm_alone, args.llm_budget)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine judge", main))
