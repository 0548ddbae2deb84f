"""The judge cascade: tier 1 (cross-encoder) -> tier 2 -> tier 3 (LLMs), with calibrated escalation.

Each tier gives a grade, a grade distribution and a confidence, calibrated per predicted class
(isotonic, fitted on human labels). A pair escalates to the next tier only while the calibrated
confidence is below the threshold of its predicted class, and, under an LLM call budget
(`grade_frame(llm_budget=...)`), only the most uncertain pairs (lowest calibrated confidence) are
sent; the others keep the first tier's grade with `escalation = 'budget'`, to be escalated by a later
run. An escalated pair is decided by the combination of every consulted tier's grade distribution
(annomine/judges/combiner.py), fitted on human labels and kept only where it beat the first tier alone
out-of-fold; where there is none (not fitted, not better, or `cascade.combine: false`) the first tier
decides and the LLM grades are recorded in `tier_outputs` only. A pair is graded only by the cascade
the config asks for: when a tier it reaches fails (after that tier's retries), the pair goes no
further, gets a null grade and an error naming each failed tier and why, and keeps the outputs of the
tiers that answered in `tier_outputs` (the annotate job retries it in a later run).
`Cascade.grade_frame` is a pure pandas transform used both inside the annotate job's pandas UDF and by
`annomine judge eval`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.errors import DamagedInputError, EndpointError
from annomine.judges.calibration import Calibrator, fit_calibrator
from annomine.judges.combiner import Combiner, distribution, fit_path
from annomine.judges.config import CascadeConfig, LLMTierConfig  # noqa: F401 - re-exported
from annomine.judges.llm import LOOPBACK_KEY, LLMTier, TierResult, expected_grade, resolve_api_key
from annomine.judges.stack import judge_vector_key

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["grade", "confidence", "deciding_tier", "tier_outputs", "latency_ms", "prompt_tokens",
                  "completion_tokens", "error", "escalation"]
# escalation: None (the first tier settled it, or there is no later tier), 'escalated' (every tier it
# needed was consulted), 'budget' (it needed a later tier but the LLM call budget was spent), 'batch' (a later
# tier's answer was queued for a batch: the pair keeps the grade of the tiers before it until the answer is collected).
ESCALATED, BUDGET, BATCH = "escalated", "budget", "batch"
COMBINED = "combined"
# An optional input column of `grade_frame`: the product text's vector under tier 1's `text_vector_key` (the ANN
# channel's, from `product_embeddings`), used instead of encoding the text again; a missing vector is encoded.
TEXT_VECTOR = "text_vector"


class Tier1:
    """The cross-encoder tier; the model is loaded once per process from its folder."""

    name = "tier1"

    def __init__(self, folder: str | Path, grades: list[int]):
        from annomine.judges.cross_encoder import check_weights

        self.folder = str(Path(folder).resolve())
        meta_path = Path(folder) / "judge.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DamagedInputError(f"{meta_path}: not a readable judge description ({exc}); train the judge again "
                                    "(annomine judge train) or set cascade.judge to another version") from exc
        check_weights(folder)  # here, on the driver: a damaged file is one error, not one per Spark task
        if list(meta["grades"]) != list(grades):
            raise ValueError(f"judge {folder} grades {meta['grades']} but the project scale is {grades}")
        self.version = meta.get("version") or Path(folder).name
        # the `product_embeddings` key of product vectors tier 1 can take instead of encoding the texts, or None
        self.text_vector_key = judge_vector_key(meta)
        self.grades = list(grades)
        self.batch_size = 64
        # (query, text) -> result, when a command grades the same pairs twice (its forecast, then the run); None: off
        self.memo: dict | None = None

    def remember_text_vectors(self, texts: list, vectors) -> int:
        """`CrossEncoderModel.remember_text_vectors` of this process's model."""
        from annomine.judges.cross_encoder import load_cached

        return load_cached(self.folder).remember_text_vectors(texts, vectors)

    def grade_many(self, pairs: list[tuple[str, str]], concurrency: int = 1) -> list[TierResult]:
        if self.memo is None:
            return self._grade(pairs)
        todo = [p for p in dict.fromkeys(pairs) if p not in self.memo]
        self.memo.update(zip(todo, self._grade(todo)))
        return [TierResult(**{**self.memo[p].__dict__, "extra": dict(self.memo[p].extra)}) for p in pairs]

    def _grade(self, pairs: list[tuple[str, str]]) -> list[TierResult]:
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
                                  confidence_source="model", probs=dist, expected_grade=round(expected_grade(dist), 4),
                                  latency_ms=per_pair, attempts=1))
        return out


def _llm_calibration_path(judges_dir: Path, cfg: LLMTierConfig, grades: list[int]) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model)
    return judges_dir / "llm_calibration" / f"{safe}__{cfg.prompt_version}__{min(grades)}-{max(grades)}.json"


def tier_identity(tiers: list, grades: list[int]) -> dict:
    """What a combiner was fitted for: the tier-1 version and each LLM tier's model and prompt, in order."""
    return {"grades": list(grades), "tiers": [[t.name, t.version] if isinstance(t, Tier1) else
                                              [t.name, t.cfg.model, t.cfg.prompt_version] for t in tiers]}


def _combiner_path(judges_dir: Path, identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    names = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", str(t[1])) for t in identity["tiers"])[:120]
    return judges_dir / "llm_calibration" / f"combiner__{names}__{digest}.json"


def _local_server(tcfg: LLMTierConfig, local: dict, start: bool):
    """The managed llama.cpp server of a `server: local` tier: one per distinct model and settings, started now
    (`start`) or given its port now and started by `Cascade.start_local_servers`."""
    from annomine.judges.local_models import resolve_model
    from annomine.judges.local_server import LocalLLMServer, free_port

    path = resolve_model(tcfg.model)
    key = (str(path), tcfg.n_threads, tcfg.n_ctx)
    if key not in local:
        srv = LocalLLMServer(path, tcfg.model, tcfg.n_threads, tcfg.n_ctx, port=None if start else free_port(),
                             startup_timeout_s=tcfg.startup_timeout_s)
        local[key] = srv.start() if start else srv
    return local[key]


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
        self.local_servers: list = []
        # Fitted combination of the consulted tiers' distributions (None: the first tier decides).
        self.combiner: Combiner | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["server"] = None
        state["local_servers"] = []
        return state

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def text_vector_key(self) -> str | None:
        """The `product_embeddings` key whose vectors `grade_frame` can take in its `text_vector` column, or None."""
        return next((t.text_vector_key for t in self.tiers if isinstance(t, Tier1)), None)

    @property
    def kept_combinations(self) -> list[str]:
        """The tier paths (e.g. 'tier1+tier2') whose fitted combination decides escalated pairs."""
        return sorted(self.combiner.paths) if self.combiner else []

    @property
    def combination_rejected(self) -> bool:
        """Whether calibration fitted the combinations of these tiers and kept none: an escalated pair's LLM grades
        would then be recorded and never decide it (without a fitted combiner nothing is known yet)."""
        return self.combiner is not None and not self.combiner.paths

    @property
    def escalated_pairs_decided_by(self) -> str:
        kept = self.kept_combinations
        return f"the combination of {', '.join(kept)}" if kept else f"{self.tier_names[0]} (no combination kept)"

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
        if llm and self.combiner is not None and self.combiner.paths:
            llm.append(["combiner", self.combiner.digest])
        if llm:
            digest = hashlib.sha256(json.dumps(llm, sort_keys=True).encode()).hexdigest()[:10]
            parts.append(f"llm-{digest}")
        return "+".join(parts)

    def describe(self) -> dict:
        return {"version": self.version, "tiers": [
            {"name": t.name, "model": getattr(getattr(t, "cfg", None), "model", None) or getattr(t, "version", None),
             "thresholds": self.calibrators[t.name].thresholds} for t in self.tiers],
            "combiner": sorted(self.combiner.paths) if self.combiner else []}

    @property
    def llm_tier_names(self) -> list[str]:
        return [t.name for t in self.tiers if not isinstance(t, Tier1)]

    def start_local_servers(self) -> None:
        """Start the managed local model servers that are not running yet."""
        for srv in self.local_servers:
            if srv.proc is None:
                srv.start()

    def combiner_path(self) -> Path | None:
        return _combiner_path(self.judges_dir, tier_identity(self.tiers, self.grades)) if self.judges_dir else None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: CascadeConfig, judge_folder: str | Path | None, grades: list[int], warehouse: str | Path | None = None,
             concurrency: int | None = None, start_local: bool = True):
        """Build the cascade; start the embedded loopback LLM server when configured (stopped on exit). With
        `start_local=False` a `server: local` model server gets its port now and starts at `start_local_servers()`,
        which a command calls only when it will make a request."""
        from annomine.judges.store import judges_root

        server = None
        local: dict[tuple, object] = {}
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
                if tcfg.server == "local":
                    base_url = _local_server(tcfg, local, start_local).base_url
                elif not base_url:
                    if server is None:
                        from annomine.judges.loopback_server import LoopbackLLMServer

                        lb = cfg.loopback
                        server = LoopbackLLMServer(latency_ms=lb.latency_ms, faults=lb.faults, grades=grades, seed=lb.seed,
                                                   slow_ms=lb.slow_ms, retry_after_s=lb.retry_after_s).start()
                        log.info("embedded loopback LLM server on %s", server.base_url)
                    base_url = server.base_url
                key_value = LOOPBACK_KEY if tcfg.server == "local" else resolve_api_key(tcfg, base_url)
                tiers.append(LLMTier(name, tcfg, grades, base_url, key_value))
                cal_path = _llm_calibration_path(judges_dir, tcfg, grades) if judges_dir else None
                calibrators[name] = (Calibrator.load(cal_path) if cal_path and cal_path.is_file()
                                     else Calibrator.uncalibrated(grades, tcfg.default_threshold))
            cascade = cls(grades, tiers, calibrators, concurrency or cfg.max_concurrency_total, judges_dir)
            cascade.server = server
            cascade.local_servers = list(local.values())
            comb_path = cascade.combiner_path()
            if cfg.combine and len(tiers) > 1 and comb_path is not None and comb_path.is_file():
                cascade.combiner = Combiner.load(comb_path)
            yield cascade
        finally:
            if server is not None:
                server.stop()
            for srv in local.values():
                srv.stop()

    # ---- grading ------------------------------------------------------------------------
    def _inputs(self, pdf: pd.DataFrame) -> tuple[list, list, list, list[int]]:
        """The frame's queries and texts, the input error of each row (a missing query or product text) and the rows
        to grade; the `text_vector` column's vectors go to tier 1 first."""
        queries = ["" if q is None or (isinstance(q, float) and np.isnan(q)) else str(q) for q in pdf["query"]]
        texts = [None if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in pdf["text"]]
        if TEXT_VECTOR in pdf.columns:
            for tier in self.tiers:
                if isinstance(tier, Tier1):
                    tier.remember_text_vectors(texts, pdf[TEXT_VECTOR].tolist())
        input_error: list[str | None] = [None] * len(pdf)
        pending = []
        for i, (query, text) in enumerate(zip(queries, texts)):
            if text is None or not text.strip():
                input_error[i] = "product text missing (product not in products table?)"
            elif not query.strip():
                input_error[i] = "query text missing"
            else:
                pending.append(i)
        return queries, texts, input_error, pending

    def grade_frame(self, pdf: pd.DataFrame, progress: bool = False, concurrency: int | None = None,
                    llm_budget: int | None = None) -> pd.DataFrame:
        """Grade a frame with columns query, text (and any keys); returns it with RESULT_COLUMNS added
        plus `n_tiers` (tiers consulted), `llm_calls` (pairs sent to LLM tiers) and `llm_requests` (HTTP
        attempts). `llm_budget`: at most this many LLM tier calls, spent on the least confident pairs first."""
        n = len(pdf)
        concurrency = concurrency or self.concurrency
        queries, texts, input_error, pending = self._inputs(pdf)
        outputs: list[dict[str, TierResult]] = [dict() for _ in range(n)]
        escalation: list[str | None] = [None] * n
        remaining = None if llm_budget is None else max(0, int(llm_budget))
        last = len(self.tiers) - 1
        for k, tier in enumerate(self.tiers):
            if not pending:
                break
            if k > 0:
                for i in pending:
                    escalation[i] = ESCALATED
                if not isinstance(tier, Tier1) and remaining is not None:
                    prev = self.tiers[k - 1].name  # most uncertain first; the rest wait for a later budget
                    pending = sorted(pending, key=lambda i: (outputs[i][prev].confidence or 0.0, i))
                    pending, remaining = _within_budget(tier, pending, queries, texts, remaining, escalation)
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
                if r.extra.get("batch") == "queued":  # waits for its batch answer (annomine/judges/batch.py)
                    escalation[i] = BATCH
                elif not r.sure and r.grade is not None and k < last:  # a failed tier ends the pair's climb
                    still.append(i)
            log.log(logging.INFO if progress else logging.DEBUG, "%s: %d pairs in %.1fs, %d escalate", tier.name,
                    len(pending), time.time() - t0, len(still))
            pending = still
        rows = [self._decide(outputs[i], input_error[i], escalation[i]) for i in range(n)]
        out = pdf.copy()
        for col in RESULT_COLUMNS + ["n_tiers", "llm_calls", "llm_requests"]:
            out[col] = [r[col] for r in rows]
        return out

    def _decide(self, outs: dict[str, TierResult], input_error: str | None, escalation: str | None = None) -> dict:
        """The pair's grade: the first tier's when it was settled there (or nothing better is fitted), else the
        kept combination of the consulted tiers' distributions; None with the error when a tier failed."""
        row = {"grade": None, "confidence": None, "deciding_tier": None, "tier_outputs": "{}", "latency_ms": 0.0,
               "prompt_tokens": 0, "completion_tokens": 0, "error": input_error, "n_tiers": len(outs), "llm_requests": 0,
               "llm_calls": 0, "escalation": None if input_error else escalation}
        if input_error:
            return row
        row["tier_outputs"] = json.dumps({name: r.to_dict() for name, r in outs.items()}, default=float)
        row["latency_ms"] = float(sum(r.latency_ms for r in outs.values()))
        row["prompt_tokens"] = int(sum(r.prompt_tokens for r in outs.values()))
        row["completion_tokens"] = int(sum(r.completion_tokens for r in outs.values()))
        row["llm_requests"] = int(sum(r.attempts for name, r in outs.items() if name != "tier1"))
        row["llm_calls"] = int(sum(1 for name, r in outs.items() if name != "tier1" and not r.extra.get("deduplicated")
                                   and r.extra.get("cache") != "hit"))
        outs = {name: r for name, r in outs.items() if r.extra.get("batch") != "queued"}  # decided without them
        failed = [(name, r) for name, r in outs.items() if r.grade is None]
        if failed or not outs:
            row["error"] = "; ".join(f"{name}: {r.error or 'no grade'}" for name, r in failed) or "no tier ran"
            return row
        names = list(outs)
        first = outs[names[0]]
        comb = self.combiner.for_path(names) if self.combiner is not None and len(names) > 1 else None
        if comb is not None:
            probs = comb.predict_proba([distribution(outs[t], self.grades)[None, :] for t in names], self.grades)[0]
            j = int(np.argmax(probs))
            row.update(grade=int(self.grades[j]), confidence=float(probs[j]), deciding_tier=COMBINED)
            return row
        row.update(grade=int(first.grade), confidence=float(first.confidence if first.confidence is not None else 0.0),
                   deciding_tier=names[0])
        return row


def _within_budget(tier, pending: list[int], queries: list, texts: list, remaining: int,
                   escalation: list) -> tuple[list[int], int]:
    """The pending pairs `tier` may grade under a budget of `remaining` calls (in order; a stored answer costs no
    call, duplicates share one), the rest marked deferred by the budget; and the calls left."""
    stored = {i for i in pending if tier.is_stored(queries[i], texts[i])}
    sent, calls = set(stored), set()
    for i in (i for i in pending if i not in stored):
        if (queries[i], texts[i]) not in calls and len(calls) >= remaining:
            escalation[i] = BUDGET
            continue
        calls.add((queries[i], texts[i]))
        sent.add(i)
    return [i for i in pending if i in sent], remaining - len(calls)


def cascade_metrics(truth: np.ndarray, graded: pd.DataFrame, grades: list[int]) -> dict:
    """Agreement, QWK and confusion against human grades, plus escalation rate and share per tier, the
    first tier alone (its grade on every pair, as if nothing escalated), and LLM calls."""
    from annomine.judges.data import grading_metrics

    pred = [None if pd.isna(g) else int(g) for g in graded["grade"]]
    m = grading_metrics(truth, pred, grades)
    n = max(len(graded), 1)
    m["escalation_rate"] = float((graded["n_tiers"] > 1).sum() / n)
    if "escalation" in graded:
        m["deferred_by_budget_rate"] = float((graded["escalation"] == BUDGET).sum() / n)
    shares = graded["deciding_tier"].fillna("error").value_counts()
    m["share_per_tier"] = {k: float(shares.get(k, 0) / n) for k in ("tier1", "tier2", "tier3", COMBINED, "error")}
    m["error_rate"] = float(graded["error"].notna().sum() / n)
    m["llm_requests_per_pair"] = float(graded["llm_requests"].sum() / n)
    if "llm_calls" in graded:
        m["llm_calls"] = int(graded["llm_calls"].sum())
    per_tier = {}
    firsts = []
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
            firsts.append(name)
    m["per_tier"] = per_tier
    if firsts:  # the first tier's own grade on every pair it graded: "tier 1 alone"
        alone = [json.loads(js).get(firsts[0], {}).get("grade") for js in graded["tier_outputs"]]
        am = grading_metrics(truth, alone, grades)
        m["first_tier_alone"] = {"tier": firsts[0], "exact_agreement": am["exact_agreement"],
                                 "quadratic_weighted_kappa": am["quadratic_weighted_kappa"], "n_graded": am["n_graded"]}
    decided = graded["deciding_tier"].notna()
    m["agreement_by_deciding_tier"] = {
        k: float(np.mean([int(p) == int(t) for p, t, d in zip(pred, truth, graded["deciding_tier"]) if d == k]))
        for k in graded.loc[decided, "deciding_tier"].unique()}
    return m


def least_sure_first(cascade: Cascade, cal_df: pd.DataFrame, first_results: list[TierResult] | None, limit: int) -> np.ndarray:
    """Row indices of at most `limit` calibration pairs for the LLM tiers: the ones the first tier is least sure
    of (lowest calibrated confidence; those are what escalates), or a seeded sample without a first tier."""
    n = len(cal_df)
    if limit >= n:
        return np.arange(n)
    if first_results is None:
        return np.sort(np.random.default_rng(13).permutation(n)[:limit])
    conf = np.array([r.confidence if r.confidence is not None else -1.0 for r in first_results], dtype=float)
    return np.sort(np.argsort(conf, kind="stable")[:limit])


def calibrate_cascade(cascade: Cascade, cal_df: pd.DataFrame, target_agreement: float = 0.9,
                      only: list[str] | None = None, llm_pairs: int | None = None, combine: bool = True,
                      min_gain: float = 0.01) -> dict:
    """Fit every tier's (or the `only` tiers') per-class isotonic calibration on the calibration split and save it;
    then the combiner of the consulted tiers' distributions (kept per path only when it beats the first tier alone
    out-of-fold by query). LLM tiers grade at most `llm_pairs` pairs: those the first tier is least sure of."""
    if cal_df.empty:
        raise ValueError("the calibration split is empty")
    pairs = list(zip(cal_df["query"].astype(str), cal_df["text"].astype(str)))
    truth = cal_df["grade"].astype(int).to_numpy()
    stats: dict = {}
    results_by_tier: dict[str, list] = {}
    chosen = np.arange(len(pairs))
    if llm_pairs is not None and not isinstance(cascade.tiers[0], Tier1):
        chosen = least_sure_first(cascade, cal_df, None, int(llm_pairs))
    first_results = None
    for k, tier in enumerate(cascade.tiers):
        fit_this = not only or tier.name in only
        if isinstance(tier, Tier1):
            rows = np.arange(len(pairs))
            results = first_results = tier.grade_many(pairs, cascade.concurrency)
        else:
            if not (fit_this or combine):
                continue
            rows = chosen
            results = tier.grade_many([pairs[i] for i in rows], cascade.concurrency)
        ok = [i for i, r in enumerate(results) if r.grade is not None]
        if fit_this:
            if not ok:
                dead = [r for r in (srv.exit_report() for srv in cascade.local_servers) if r]
                where = f" ({tier.base_url})" if isinstance(tier, LLMTier) else ""
                raise EndpointError(f"{tier.name}{where}: no calibration pair could be graded (first error: "
                                    f"{results[0].error})" + "".join(f"; {r}" for r in dead))
            cal = fit_calibrator([results[i].grade for i in ok], [results[i].raw_confidence for i in ok], truth[rows][ok],
                                 cascade.grades, target_agreement)
            if isinstance(tier, Tier1):
                path = Path(tier.folder) / "calibration_tier1.json"
            else:
                path = _llm_calibration_path(cascade.judges_dir, tier.cfg, cascade.grades)
            path.parent.mkdir(parents=True, exist_ok=True)
            cal.save(path)
            cascade.calibrators[tier.name] = cal
            stats[tier.name] = {"path": str(path), "graded": len(ok), "errors": len(results) - len(ok), **cal.stats}
            if not isinstance(tier, Tier1):
                stats[tier.name]["pairs"] = ("all calibration pairs" if len(rows) == len(pairs) else
                                             f"the {len(rows)} the first tier is least sure of" if first_results is not None
                                             else f"a seeded sample of {len(rows)}")
        _apply_calibration(cascade.calibrators[tier.name], results)
        results_by_tier[tier.name] = [None] * len(pairs)
        for i, r in zip(rows, results):
            results_by_tier[tier.name][i] = r
        if k == 0 and llm_pairs is not None and isinstance(tier, Tier1):  # the LLM tiers' pairs: what the first tier is least sure of
            chosen = least_sure_first(cascade, cal_df, first_results, int(llm_pairs))
    if combine and len(cascade.tiers) > 1:
        stats["combiner"] = fit_combiner(cascade, results_by_tier, cal_df, chosen, min_gain)
    stats["version"] = cascade.version
    return stats


def _apply_calibration(cal: Calibrator, results: list[TierResult]) -> None:
    graded = [r for r in results if r.grade is not None]
    if graded:
        conf = cal.calibrate(np.array([r.grade for r in graded]), np.array([r.raw_confidence for r in graded]))
        for r, c in zip(graded, conf):
            r.confidence = float(c)
            r.sure = bool(c >= cal.threshold(r.grade))


def fit_combiner(cascade: Cascade, results_by_tier: dict[str, list], cal_df: pd.DataFrame, rows: np.ndarray,
                 min_gain: float = 0.01) -> dict:
    """Fit, score and save the combiner for each path of the cascade (first tier + the next ones) on the calibration
    pairs every tier of the path graded; a path is kept only when it beats the first tier alone out-of-fold."""
    names = cascade.tier_names
    truth = cal_df["grade"].astype(int).to_numpy()
    groups = cal_df["query_id"].astype(str).to_numpy() if "query_id" in cal_df else np.arange(len(cal_df)).astype(str)
    combiner = Combiner(cascade.grades, tier_identity(cascade.tiers, cascade.grades))
    for end in range(2, len(names) + 1):
        path = names[:end]
        idx = [int(i) for i in rows if all(results_by_tier.get(t) and results_by_tier[t][i] is not None
                                           and results_by_tier[t][i].grade is not None for t in path)]
        dists = [np.stack([distribution(results_by_tier[t][i], cascade.grades) for i in idx]) if idx else
                 np.zeros((0, len(cascade.grades))) for t in path]
        baseline = np.array([results_by_tier[path[0]][i].grade for i in idx], dtype=int)
        comb, report = fit_path(dists, baseline, truth[idx], groups[idx], path, cascade.grades, min_gain=min_gain)
        combiner.report["+".join(path)] = report
        if comb is not None:
            combiner.paths["+".join(path)] = comb
    target = cascade.combiner_path()
    if target is not None:
        combiner.save(target)
    cascade.combiner = combiner if combiner.paths else None
    kept = sorted(combiner.paths)
    return {"path": str(target) if target else None, "kept": kept, "report": combiner.report,
            "decides_escalated_pairs": (f"the combination ({', '.join(kept)})" if kept else
                                        f"{names[0]} (no combination beat it)")}
