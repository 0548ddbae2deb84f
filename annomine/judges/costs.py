"""What LLM grading costs: each tier's tokens priced from its config, per run, in the `llm_ledger` table.

A tier's price is `input_usd_per_mtok` / `output_usd_per_mtok` (USD per million prompt / completion tokens); a
`server: local` tier and the embedded loopback server cost 0 unless priced; any other unpriced tier is `unpriced`
(its cost is None, never a guessed number). Tokens are those the endpoints reported for the requests a run made;
answers taken from the response cache cost nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pandas as pd

LEDGER = "llm_ledger"


def price(cfg) -> tuple[float, float] | None:
    """(USD per million prompt tokens, per million completion tokens), or None when the tier is unpriced."""
    if cfg.input_usd_per_mtok is not None or cfg.output_usd_per_mtok is not None:
        return float(cfg.input_usd_per_mtok or 0.0), float(cfg.output_usd_per_mtok or 0.0)
    if cfg.server == "local" or not cfg.base_url:
        return 0.0, 0.0
    return None


def cost_usd(cfg, prompt_tokens: float, completion_tokens: float) -> float | None:
    p = price(cfg)
    return None if p is None else (prompt_tokens * p[0] + completion_tokens * p[1]) / 1e6


def batch_usd(cfg, usd: float | None) -> float | None:
    """What `usd` of requests would cost through the endpoint's batch API (`batch_discount`)."""
    return None if usd is None else round(usd * (1.0 - cfg.batch_discount), 6)


def usage_by_tier(tier_outputs: Iterable[str], names: list[str]) -> dict[str, dict]:
    """Per LLM tier: answers from the cache (`hits`), requests made (`misses`) and the tokens those used."""
    counts = {n: {"hits": 0, "misses": 0, "prompt_tokens": 0, "completion_tokens": 0} for n in names}
    for text in tier_outputs:
        for name, r in json.loads(text or "{}").items():
            if name not in counts or r.get("cache") not in ("hit", "miss"):
                continue
            c = counts[name]
            c["hits" if r["cache"] == "hit" else "misses"] += 1
            c["prompt_tokens"] += int(r.get("prompt_tokens") or 0)
            c["completion_tokens"] += int(r.get("completion_tokens") or 0)
    return counts


def add_usage(total: dict, chunk: dict) -> None:
    for name, c in chunk.items():
        t = total.setdefault(name, {k: 0 for k in c})
        for k, v in c.items():
            t[k] += v


def spend(usage: dict[str, dict], tiers: list, batch: bool = False) -> dict:
    """Tokens and USD per tier and in all (`usd` None when a tier that made requests is unpriced); with `batch` the
    requests went through the endpoint's batch API and are priced with its `batch_discount`."""
    cfgs = {t.name: t.cfg for t in tiers if hasattr(t, "cfg")}
    per_tier, total, unpriced = {}, 0.0, []
    for name, u in usage.items():
        usd = cost_usd(cfgs[name], u["prompt_tokens"], u["completion_tokens"])
        if batch:
            usd = batch_usd(cfgs[name], usd)
        per_tier[name] = {"model": cfgs[name].model, "requests": u["misses"], "cache_hits": u["hits"],
                          "prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                          "usd": None if usd is None else round(usd, 6),
                          "usd_if_batch": usd if batch else batch_usd(cfgs[name], usd)}
        if usd is None:
            unpriced.append(name)
        else:
            total += usd
    return {"per_tier": per_tier, "usd": None if unpriced else round(total, 6), "unpriced_tiers": unpriced}


def write_ledger(tables, run_id: str, command: str, judge_version: str | None, spent: dict) -> int:
    """One `llm_ledger` row per tier of this run (MERGE on run and tier: a re-written run keeps one row each)."""
    if not spent["per_tier"]:
        return 0
    from annomine.schemas import TABLES

    now = pd.Timestamp.now(tz="UTC").tz_localize(None)
    rows = [{"run_id": run_id, "tier": name, "command": command, "judge_version": judge_version, "model": t["model"],
             "requests": t["requests"], "cache_hits": t["cache_hits"], "prompt_tokens": t["prompt_tokens"],
             "completion_tokens": t["completion_tokens"], "usd": t["usd"], "recorded_at": now}
            for name, t in spent["per_tier"].items()]
    from annomine.judges.response_cache import ensure_created

    frame = pd.DataFrame(rows)[TABLES[LEDGER].columns]
    ensure_created(tables, LEDGER)
    tables.merge(LEDGER, tables.spark.createDataFrame(frame, schema=TABLES[LEDGER].schema))
    return len(rows)


# Characters per prompt token when no answer of a tier's settings is stored yet (English text, BPE tokenizers).
DEFAULT_CHARS_PER_TOKEN = 4.0


def history(tables, tiers: list) -> dict[str, dict]:
    """Per LLM tier, from the stored answers of its settings: characters per prompt token and completion tokens per
    answer; without any, 4 characters a token and the tier's `max_tokens` (the most an answer can use)."""
    from annomine.judges.response_cache import TABLE, tier_settings_key

    llm = [t for t in tiers if hasattr(t, "cfg")]
    out = {t.name: {"chars_per_token": DEFAULT_CHARS_PER_TOKEN, "completion_tokens": float(t.cfg.max_tokens),
                    "source": "default (no stored answer)"} for t in llm}
    if not llm or not tables.exists(TABLE):
        return out
    from pyspark.sql import functions as F

    keys = {tier_settings_key(t): t.name for t in llm}
    stats = (tables.read(TABLE).filter(F.col("settings_key").isin(list(keys)) & (F.col("prompt_chars") > 0))
             .groupBy("settings_key").agg(F.count(F.lit(1)).alias("n"), F.sum("prompt_chars").alias("chars"),
                                          F.sum("prompt_tokens").alias("tokens"),
                                          F.avg("completion_tokens").alias("completion")).toPandas())
    for r in stats.itertuples():
        if r.tokens and r.tokens > 0:
            out[keys[r.settings_key]] = {"chars_per_token": float(r.chars) / float(r.tokens),
                                         "completion_tokens": float(r.completion), "source": f"{int(r.n)} stored answers"}
    return out


def estimate_tokens(tier, hist: dict, query: str, text: str) -> tuple[float, float]:
    """(prompt tokens, completion tokens) one request of `tier` for the pair is expected to use."""
    from annomine.judges.response_cache import prompt_chars

    h = hist[tier.name]
    return prompt_chars(tier.messages(query, text)) / h["chars_per_token"], h["completion_tokens"]


def pair_cost_usd(tiers: list, hist: dict, query: str, text: str) -> float:
    """The most one escalated pair can cost: a request to every LLM tier (priced tiers only)."""
    total = 0.0
    for tier in tiers:
        if hasattr(tier, "cfg") and not tier.is_stored(query, text):
            p, c = estimate_tokens(tier, hist, query, text)
            total += cost_usd(tier.cfg, p, c) or 0.0
    return total
