"""What a run will spend before it makes a request: pairs that escalate, requests, tokens and money per LLM tier.

The first tier grades every pair (tier 1 is local and free; an LLM first tier is not run: every pair is its);
the pairs it is unsure of go up, least sure first, as in `Cascade.grade_frame`. Per LLM tier: the pairs whose
answer is in the response cache cost nothing; the others are requests, cut by `llm_budget` (calls) and `max_cost`
(USD, each pair at its estimated cost) in that order. A request's prompt tokens are its real prompt's characters
(annomine/judges/prompt.py) over the tier's characters per token, its completion tokens the tier's mean per answer
(both from the stored answers, costs.history; else 4 characters a token and `max_tokens`). A later tier gets the
share of the earlier tier's pairs that reached it in earlier runs (`llm_ledger`), else all of them (the most).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from annomine.judges.costs import batch_usd, cost_usd, estimate_tokens


def first_tier_unsure(cascade, pairs: list[tuple[str, str]]) -> list[int]:
    """Indices of the pairs the first tier sends up, least sure first (all of them for an LLM first tier)."""
    first = cascade.tiers[0]
    if hasattr(first, "cfg"):
        return list(range(len(pairs)))
    results = first.grade_many(pairs, cascade.concurrency)
    cal = cascade.calibrators[first.name]
    conf = cal.calibrate(np.array([r.grade for r in results]), np.array([r.raw_confidence for r in results]))
    unsure = [i for i, (r, c) in enumerate(zip(results, conf)) if c < cal.threshold(r.grade)]
    return sorted(unsure, key=lambda i: (conf[i], i))


def forecast(cascade, pdf: pd.DataFrame, hist: dict, shares: dict[str, float], escalating: bool,
             llm_budget: int | None = None, max_cost: float | None = None, first_tier_done: bool = False) -> dict:
    """The forecast for grading `pdf` (query, text) with the cascade; no request is made. `first_tier_done`: the
    pairs are ones the first tier already sent up (deferred by a budget)."""
    ok = [(str(q), str(t)) for q, t in zip(pdf["query"], pdf["text"])
          if isinstance(q, str) and q.strip() and isinstance(t, str) and t.strip()]
    pairs = list(dict.fromkeys(ok))
    llm = [t for t in cascade.tiers if hasattr(t, "cfg")]
    out = {"pairs": len(pdf), "escalate": 0, "tiers": {}, "usd": 0.0, "unpriced_tiers": []}
    if not llm or not pairs:
        return out
    going = ([] if not escalating else list(range(len(pairs))) if first_tier_done else first_tier_unsure(cascade, pairs))
    out["escalate"] = len(going)
    if not escalating:
        out["skipped"] = "calibration kept no combination with an LLM tier (annotate.escalate: always overrides)"
    calls_left = llm_budget
    usd_left = max_cost
    share = 1.0
    for k, tier in enumerate(llm):
        if k > 0:
            share *= shares.get(tier.name, 1.0)
        stored = [i for i in going if tier.is_stored(*pairs[i])]
        paid = [i for i in going if not tier.is_stored(*pairs[i])]
        est = [estimate_tokens(tier, hist, *pairs[i]) for i in paid]
        if k == 0:
            n = len(paid) if calls_left is None else min(len(paid), calls_left)
            if usd_left is not None:
                costs = np.cumsum([cost_usd(tier.cfg, p, c) or 0.0 for p, c in est[:n]])
                n = int(np.searchsorted(costs, usd_left, side="right"))
            paid, est = paid[:n], est[:n]
            going = sorted(stored + paid, key=going.index)
        prompt = share * sum(p for p, _ in est)
        completion = share * sum(c for _, c in est)
        usd = cost_usd(tier.cfg, prompt, completion)
        out["tiers"][tier.name] = {"model": tier.cfg.model, "requests": round(share * len(paid), 1),
                                   "cache_hits": round(share * len(stored), 1), "uncached_pairs": len(paid),
                                   "prompt_tokens": round(prompt),
                                   "completion_tokens": round(completion), "usd": None if usd is None else round(usd, 6),
                                   "usd_if_batch": batch_usd(tier.cfg, usd),
                                   "share_of_previous_tier": round(shares.get(tier.name, 1.0), 3) if k else None,
                                   "tokens_per_request_from": hist[tier.name]["source"]}
        if usd is None:
            out["unpriced_tiers"].append(tier.name)
        else:
            out["usd"] += usd
    out["usd"] = None if out["unpriced_tiers"] else round(out["usd"], 6)
    return out


def tier_shares(tables, names: list[str]) -> dict[str, float]:
    """Per later LLM tier: the pairs it got over those the tier before it got, in earlier annotate runs."""
    from annomine.judges.costs import LEDGER

    if len(names) < 2 or not tables.exists(LEDGER):
        return {}
    led = tables.read(LEDGER).filter("command = 'annotate'").select("tier", "requests", "cache_hits").toPandas()
    got = (led["requests"] + led["cache_hits"]).groupby(led["tier"]).sum()
    return {b: float(got[b] / got[a]) for a, b in zip(names, names[1:]) if got.get(a, 0) > 0 and b in got}
