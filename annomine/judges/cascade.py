"""The judge cascade: tier 1 (cross-encoder) -> tier 2 -> tier 3 (LLMs), with calibrated escalation.

Each tier gives a grade and a confidence, calibrated per predicted class (isotonic, fitted on
human labels). A pair escalates to the next tier only while the calibrated confidence is below
the threshold of its predicted class. When no tier is sure, the grades of the tiers consulted
are put to a majority vote, a tie going to the grade whose supporter had the highest calibrated
probability. A pair is graded only by the cascade the config asks for: when a tier it reaches
fails (after that tier's retries), the pair goes no further, gets a null grade and an error naming
each failed tier and why, and keeps the outputs of the tiers that answered in `tier_outputs` (the
annotate job retries it in a later run). `Cascade.grade_frame` is a pure pandas transform used
both inside the annotate job's pandas UDF and by `annomine judge eval`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.judges.calibration import Calibrator, fit_calibrator
from annomine.judges.config import CascadeConfig, LLMTierConfig  # noqa: F401 - re-exported
from annomine.judges.llm import LLMTier, TierResult, resolve_api_key

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["grade", "confidence", "deciding_tier", "tier_outputs", "latency_ms", "prompt_tokens",
                  "completion_tokens", "error"]


class Tier1:
    """The cross-encoder tier; the model is loaded once per process from its folder."""

    name = "tier1"

    def __init__(self, folder: str | Path, grades: list[int]):
        self.folder = str(Path(folder).resolve())
        meta = json.loads((Path(folder) / "judge.json").read_text())
        if list(meta["grades"]) != list(grades):
            raise ValueError(f"judge {folder} grades {meta['grades']} but the project scale is {grades}")
        self.version = meta.get("version") or Path(folder).name
        self.grades = list(grades)
        self.batch_size = 64

    def grade_many(self, pairs: list[tuple[str, str]], concurrency: int = 1) -> list[TierResult]:
        from annomine.judges.cross_encoder import load_cached

        if not pairs:
            return []
        model = load_cached(self.folder)
        started = time.perf_counter()
        probs = model.predict_proba([q for q, _ in pairs], [t for _, t in pairs], batch_size=self.batch_size)
        pred = model.decide(probs)
        per_pair = (time.perf_counter() - started) * 1000.0 / len(pairs)
        out = []
        for row, g in zip(probs, pred):
            dist = {int(k): round(float(p), 4) for k, p in zip(self.grades, row)}
            out.append(TierResult(grade=int(g), raw_confidence=float(row[self.grades.index(int(g))]),
                                  confidence_source="model", probs=dist, latency_ms=per_pair, attempts=1))
        return out


def _llm_calibration_path(judges_dir: Path, cfg: LLMTierConfig, grades: list[int]) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model)
    return judges_dir / "llm_calibration" / f"{safe}__{cfg.prompt_version}__{min(grades)}-{max(grades)}.json"


class Cascade:
    """Tiers with their calibrators; picklable (a pandas-UDF closure carries it to the workers)."""

    def __init__(self, grades: list[int], tiers: list, calibrators: dict[str, Calibrator], concurrency: int,
                 judges_dir: Path | None = None):
        self.grades = list(grades)
        self.tiers = tiers
        self.calibrators = calibrators
        self.concurrency = max(1, int(concurrency))
        self.judges_dir = judges_dir
        self.server = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["server"] = None
        return state

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def version(self) -> str:
        """Annotations are keyed by this: tier-1 version, plus a hash of the LLM tiers' identity
        (model, prompt version, calibration thresholds) when they take part."""
        parts = []
        llm = []
        for t in self.tiers:
            if isinstance(t, Tier1):
                parts.append(t.version)
            else:
                llm.append([t.name, t.cfg.model, t.cfg.prompt_version, self.calibrators[t.name].thresholds])
        if llm:
            digest = hashlib.sha256(json.dumps(llm, sort_keys=True).encode()).hexdigest()[:10]
            parts.append(f"llm-{digest}")
        return "+".join(parts)

    def describe(self) -> dict:
        return {"version": self.version, "tiers": [
            {"name": t.name, "model": getattr(getattr(t, "cfg", None), "model", None) or getattr(t, "version", None),
             "thresholds": self.calibrators[t.name].thresholds} for t in self.tiers]}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: CascadeConfig, judge_folder: str | Path | None, grades: list[int], warehouse: str | Path | None = None,
             concurrency: int | None = None):
        """Build the cascade; start the embedded loopback LLM server when configured (stopped on exit)."""
        from annomine.judges.store import judges_root

        server = None
        tiers: list = []
        calibrators: dict[str, Calibrator] = {}
        judges_dir = judges_root(warehouse) if warehouse else (Path(judge_folder).parent if judge_folder else None)
        try:
            if cfg.tier1:
                if judge_folder is None:
                    raise ValueError("tier 1 is enabled but no judge folder was given")
                t1 = Tier1(judge_folder, grades)
                t1.batch_size = cfg.tier1_batch_size
                tiers.append(t1)
                cal_path = Path(judge_folder) / "calibration_tier1.json"
                calibrators["tier1"] = Calibrator.load(cal_path) if cal_path.is_file() else Calibrator.uncalibrated(grades, 0.0)
            for name in ("tier2", "tier3"):
                tcfg: LLMTierConfig | None = getattr(cfg, name)
                if tcfg is None:
                    continue
                base_url = tcfg.base_url
                if not base_url:
                    if server is None:
                        from annomine.judges.loopback_server import LoopbackLLMServer

                        lb = cfg.loopback
                        server = LoopbackLLMServer(latency_ms=lb.latency_ms, faults=lb.faults, grades=grades, seed=lb.seed,
                                                   slow_ms=lb.slow_ms, retry_after_s=lb.retry_after_s).start()
                        log.info("embedded loopback LLM server on %s", server.base_url)
                    base_url = server.base_url
                tiers.append(LLMTier(name, tcfg, grades, base_url, resolve_api_key(tcfg, base_url)))
                cal_path = _llm_calibration_path(judges_dir, tcfg, grades) if judges_dir else None
                calibrators[name] = (Calibrator.load(cal_path) if cal_path and cal_path.is_file()
                                     else Calibrator.uncalibrated(grades, tcfg.default_threshold))
            cascade = cls(grades, tiers, calibrators, concurrency or cfg.max_concurrency_total, judges_dir)
            cascade.server = server
            yield cascade
        finally:
            if server is not None:
                server.stop()

    # ---- grading ------------------------------------------------------------------------
    def grade_frame(self, pdf: pd.DataFrame, progress: bool = False, concurrency: int | None = None) -> pd.DataFrame:
        """Grade a frame with columns query, text (and any keys); returns it with RESULT_COLUMNS added
        plus `n_tiers` (tiers consulted) and `llm_requests` (HTTP attempts)."""
        n = len(pdf)
        concurrency = concurrency or self.concurrency
        queries = ["" if q is None or (isinstance(q, float) and np.isnan(q)) else str(q) for q in pdf["query"]]
        texts = [None if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in pdf["text"]]
        outputs: list[dict[str, TierResult]] = [dict() for _ in range(n)]
        input_error: list[str | None] = [None] * n
        pending = []
        for i in range(n):
            if texts[i] is None or not texts[i].strip():
                input_error[i] = "product text missing (product not in products table?)"
            elif not queries[i].strip():
                input_error[i] = "query text missing"
            else:
                pending.append(i)
        last = len(self.tiers) - 1
        for k, tier in enumerate(self.tiers):
            if not pending:
                break
            t0 = time.time()
            results = tier.grade_many([(queries[i], texts[i]) for i in pending], concurrency)
            cal = self.calibrators[tier.name]
            graded = [j for j, r in enumerate(results) if r.grade is not None]
            if graded:
                conf = cal.calibrate(np.array([results[j].grade for j in graded]), np.array([results[j].raw_confidence for j in graded]))
                for j, c in zip(graded, conf):
                    r = results[j]
                    r.confidence = float(c)
                    r.sure = bool(c >= cal.threshold(r.grade))
            still = []
            for i, r in zip(pending, results):
                outputs[i][tier.name] = r
                if not r.sure and r.grade is not None and k < last:  # a failed tier ends the pair's climb
                    still.append(i)
            log.log(logging.INFO if progress else logging.DEBUG, "%s: %d pairs in %.1fs, %d escalate", tier.name,
                    len(pending), time.time() - t0, len(still))
            pending = still
        rows = [self._decide(outputs[i], input_error[i]) for i in range(n)]
        out = pdf.copy()
        for col in RESULT_COLUMNS + ["n_tiers", "llm_requests"]:
            out[col] = [r[col] for r in rows]
        return out

    def _decide(self, outs: dict[str, TierResult], input_error: str | None) -> dict:
        row = {"grade": None, "confidence": None, "deciding_tier": None, "tier_outputs": "{}", "latency_ms": 0.0,
               "prompt_tokens": 0, "completion_tokens": 0, "error": input_error, "n_tiers": len(outs), "llm_requests": 0}
        if input_error:
            return row
        row["tier_outputs"] = json.dumps({name: r.to_dict() for name, r in outs.items()}, default=float)
        row["latency_ms"] = float(sum(r.latency_ms for r in outs.values()))
        row["prompt_tokens"] = int(sum(r.prompt_tokens for r in outs.values()))
        row["completion_tokens"] = int(sum(r.completion_tokens for r in outs.values()))
        row["llm_requests"] = int(sum(r.attempts for name, r in outs.items() if name != "tier1"))
        failed = [(name, r) for name, r in outs.items() if r.grade is None]
        if failed or not outs:
            row["error"] = "; ".join(f"{name}: {r.error or 'no grade'}" for name, r in failed) or "no tier ran"
            return row
        sure = [(name, r) for name, r in outs.items() if r.sure]
        if sure or len(outs) == 1:
            name, r = (sure or list(outs.items()))[0]
            row.update(grade=int(r.grade), confidence=float(r.confidence), deciding_tier=name)
            return row
        counts = Counter(int(r.grade) for r in outs.values())
        top = max(counts.values())
        tied = {g for g, c in counts.items() if c == top}
        best = max((r for r in outs.values() if int(r.grade) in tied), key=lambda r: (r.confidence or 0.0))
        row.update(grade=int(best.grade), confidence=float(best.confidence or 0.0), deciding_tier="vote")
        return row


def cascade_metrics(truth: np.ndarray, graded: pd.DataFrame, grades: list[int]) -> dict:
    """Agreement, QWK and confusion against human grades, plus escalation rate and share per tier."""
    from annomine.judges.data import grading_metrics

    pred = [None if pd.isna(g) else int(g) for g in graded["grade"]]
    m = grading_metrics(truth, pred, grades)
    n = max(len(graded), 1)
    m["escalation_rate"] = float((graded["n_tiers"] > 1).sum() / n)
    shares = graded["deciding_tier"].fillna("error").value_counts()
    m["share_per_tier"] = {k: float(shares.get(k, 0) / n) for k in ("tier1", "tier2", "tier3", "vote", "error")}
    m["error_rate"] = float(graded["error"].notna().sum() / n)
    m["llm_requests_per_pair"] = float(graded["llm_requests"].sum() / n)
    per_tier = {}
    for name in ("tier1", "tier2", "tier3"):
        g_t, h_t, unsure = [], [], 0
        for js, h in zip(graded["tier_outputs"], truth):
            r = json.loads(js).get(name)
            if r is not None and r.get("grade") is not None:
                g_t.append(int(r["grade"]))
                h_t.append(int(h))
                unsure += 0 if r.get("sure") else 1
        if g_t:
            tm = grading_metrics(h_t, g_t, grades)
            per_tier[name] = {"pairs": len(g_t), "exact_agreement": tm["exact_agreement"],
                              "quadratic_weighted_kappa": tm["quadratic_weighted_kappa"], "unsure_share": unsure / len(g_t)}
    m["per_tier"] = per_tier
    decided = graded["deciding_tier"].notna()
    m["agreement_by_deciding_tier"] = {
        k: float(np.mean([int(p) == int(t) for p, t, d in zip(pred, truth, graded["deciding_tier"]) if d == k]))
        for k in graded.loc[decided, "deciding_tier"].unique()}
    return m


def calibrate_cascade(cascade: Cascade, cal_df: pd.DataFrame, target_agreement: float, only: list[str] | None = None) -> dict:
    """Fit every tier's (or the `only` tiers') per-class isotonic calibration on the calibration split and save it."""
    if cal_df.empty:
        raise ValueError("the calibration split is empty")
    pairs = list(zip(cal_df["query"].astype(str), cal_df["text"].astype(str)))
    truth = cal_df["grade"].astype(int).to_numpy()
    stats = {}
    for tier in cascade.tiers:
        if only and tier.name not in only:
            continue
        results = tier.grade_many(pairs, cascade.concurrency)
        ok = [i for i, r in enumerate(results) if r.grade is not None]
        if not ok:
            raise RuntimeError(f"{tier.name}: no calibration pair could be graded (first error: {results[0].error})")
        cal = fit_calibrator([results[i].grade for i in ok], [results[i].raw_confidence for i in ok], truth[ok],
                             cascade.grades, target_agreement)
        if isinstance(tier, Tier1):
            path = Path(tier.folder) / "calibration_tier1.json"
        else:
            path = _llm_calibration_path(cascade.judges_dir, tier.cfg, cascade.grades)
        path.parent.mkdir(parents=True, exist_ok=True)
        cal.save(path)
        cascade.calibrators[tier.name] = cal
        stats[tier.name] = {"path": str(path), "graded": len(ok), "errors": len(results) - len(ok), **cal.stats}
    stats["version"] = cascade.version
    return stats
