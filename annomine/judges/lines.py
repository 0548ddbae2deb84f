"""What the judge and annotate commands print for a person: a line or two each, the rest in their summary file.

Each function takes the dict the command wrote to `<outputs>/runs/<name>_summary.json` (annomine.run_summary),
so the pipeline's closing summary prints the same lines from the files alone.
"""

from __future__ import annotations


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def agreement(metrics: dict | None) -> str:
    """'exact agreement 0.712, QWK 0.801' of a metrics dict (tier 1's or the cascade's)."""
    metrics = metrics or {}
    return f"exact agreement {_num(metrics.get('exact_agreement'))}, QWK {_num(metrics.get('quadratic_weighted_kappa'))}"


def train_line(summary: dict) -> str:
    split = summary.get("splits", {}).get("train", {})
    history = summary.get("history", {})
    pairs = history.get("train_pairs", split.get("pairs", 0))
    return (f"judge: tier 1 {summary.get('version')} trained on {pairs:,} pairs of {split.get('queries', '?')} "
            f"queries in {history.get('train_seconds', 0):.0f}s; dev "
            + agreement(summary.get("dev_tier1")))


def combiner_outcome(stats: dict) -> str:
    """Which tier decides the pairs that escalate: what `judge calibrate` concluded about the LLM tiers."""
    combiner = stats.get("combiner") or {}
    decides = combiner.get("decides_escalated_pairs")
    return f"escalated pairs decided by {decides}" if decides else "no combiner fitted"


def calibrate_line(stats: dict) -> str:
    tiers = [k for k, v in stats.items() if isinstance(v, dict) and "graded" in v]
    graded = ", ".join(f"{t} on {stats[t]['graded']} pairs" for t in tiers) or "no tier"
    return f"judge calibrate: {graded}; {combiner_outcome(stats)}"


def eval_line(result: dict) -> str:
    return (f"judge eval ({result.get('split')}): {result.get('n_queries')} queries, " + agreement(result)
            + f", escalation rate {_num(result.get('escalation_rate'))}, {result.get('seconds', 0):.0f}s")


def pilot_line(result: dict) -> str:
    verdict = result.get("verdict") or {}
    sample = result.get("sample") or {}
    return (f"teacher pilot: {verdict.get('verdict')} ({verdict.get('reason')}); {sample.get('pairs')} labelled mined "
            f"pairs of {sample.get('queries')} queries, " + agreement(result.get("agreement")))


def tier_usage_lines(cost: dict | None) -> list[str]:
    """Per LLM tier: requests, response-cache hits, tokens and money (`spend`'s dict, annomine.judges.costs)."""
    lines = []
    for name, t in ((cost or {}).get("per_tier") or {}).items():
        money = "unpriced" if t.get("usd") is None else f"USD {t['usd']:.4f}"
        lines.append(f"{name} ({t.get('model')}): {t.get('requests', 0)} requests, {t.get('cache_hits', 0)} cache hits, "
                     f"{t.get('prompt_tokens', 0):,} prompt + {t.get('completion_tokens', 0):,} completion tokens, {money}")
    return lines


def annotate_line(stats: dict) -> str:
    by_tier = ", ".join(f"{k} {v:,}" for k, v in sorted((stats.get("by_tier") or {}).items())) or "none"
    esc = stats.get("escalation") or {}
    line = (f"annotate: {stats.get('pairs', 0):,} pairs graded ({stats.get('errors', 0)} failed) in "
            f"{stats.get('seconds', 0):.0f}s, decided by {by_tier}; {esc.get('llm_calls', 0)} LLM calls")
    if esc.get("skipped"):  # nothing escalates, so no pair waits for a budget either
        return line + f" (no escalation: {esc['skipped'].split(',')[0]})"
    return line + f", {esc.get('deferred_by_budget', 0):,} pairs left for a later run's LLM budget"
