"""One spending rule for every command that can call an LLM tier (annotate, judge eval, judge calibrate).

- Escalation: when `judge calibrate` fitted the combinations of these tiers and kept none, an LLM's grade cannot
  change any pair's grade, so no pair is sent up (`escalate: auto`); `escalate: always` asks for the calls anyway.
- Budgets: `llm_budget` (LLM calls per run) and `max_cost` (USD per run, priced tiers only).
- A forecast of requests, tokens and money (annomine/judges/forecast.py) is printed before the first request.
- A managed local model server is started only when a request will be made (`Cascade.start_local_servers`).
"""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger(__name__)

ESCALATE_CHOICES = ("auto", "always")


def check_escalate(value: str) -> None:
    if value not in ESCALATE_CHOICES:
        raise ValueError(f"escalate must be 'auto' or 'always', got {value!r}")


def skip_reason(cascade, escalate: str) -> str | None:
    """Why no pair may go to an LLM tier, or None when pairs escalate."""
    if cascade.llm_tier_names and escalate == "auto" and cascade.combination_rejected:
        return (f"calibration kept no combination with an LLM tier, so {cascade.tier_names[0]} decides every pair; no "
                "escalation to an LLM (escalate: always records the LLM's grades anyway)")
    return None


def requests_in(fc: dict) -> float:
    return float(sum(t["requests"] for t in fc.get("tiers", {}).values()))


def needs_requests(fc: dict) -> bool:
    """Whether the forecast run may make a request (a pair some LLM tier has no stored answer for)."""
    return any(t["uncached_pairs"] > 0 for t in fc.get("tiers", {}).values())


def call_budget(fc: dict, llm_budget: int | None, max_cost: float | None) -> int | None:
    """The LLM calls a run may make: `llm_budget`, and under `max_cost` no more than the forecast found affordable."""
    if max_cost is None:
        return llm_budget
    affordable = int(round(requests_in(fc)))
    return affordable if llm_budget is None else min(llm_budget, affordable)


def forecast_line(command: str, fc: dict) -> str:
    """The forecast for a person: pairs to escalate, then per LLM tier the requests, tokens and money expected."""
    def n(value) -> str:
        return "?" if value is None else f"{value:,.0f}"

    tiers = "; ".join(f"{name} ({t.get('model')}): ~{n(t.get('requests'))} requests, {n(t.get('cache_hits'))} from the "
                      f"cache, ~{n(t.get('prompt_tokens'))} + {n(t.get('completion_tokens'))} tokens, "
                      + ("unpriced" if t.get("usd") is None else f"USD {t['usd']:.4f}")
                      for name, t in sorted(fc.get("tiers", {}).items()))
    line = f"{command}: forecast before any LLM request: {n(fc.get('escalate'))} pairs to escalate"
    if fc.get("skipped"):
        line += f" (none sent: {fc['skipped']})"
    return line + (f"; {tiers}" if tiers else "")


def announce(command: str, fc: dict) -> None:
    """The forecast, one line on stderr before any request; the whole forecast goes to the debug log and the
    command's summary file."""
    print(forecast_line(command, fc), file=sys.stderr, flush=True)
    log.debug("%s forecast: %s", command, json.dumps(fc, sort_keys=True, default=float))
