"""The LLM response cache: every answer an LLM tier got, keyed by what decides it (the `llm_responses` table).

A request's `response_key` is the sha256 of the endpoint's identity, the prompt version and the request body
(model, the full messages, temperature, max_tokens, log-probability and response-format settings); the API key and
the HTTP headers are not part of it. The endpoint's identity is its configured `base_url`, `local:<model>` for a
managed llama.cpp server and `loopback:embedded` for the embedded test server (their ports change every run).
`settings_key` is the same hash without the messages: the driver loads the stored answers of the cascade's tier
settings before grading (`load_answers`), a tier answers a stored key without a request, and every new answer is
stored once (`store_answers`: a MERGE that only inserts, so concurrent writers and re-runs keep one row per key).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable

import pandas as pd

log = logging.getLogger(__name__)

TABLE = "llm_responses"
# What a stored answer holds (the parsed answer; calibrated confidence and escalation are recomputed on use).
ANSWER_FIELDS = ("grade", "raw_confidence", "confidence_source", "probs", "expected_grade", "reason")


def endpoint_identity(cfg) -> str:
    """Where answers come from: the configured base URL, or a stable name for servers on a run's own port."""
    if cfg.server == "local":
        return f"local:{cfg.model}:n_ctx={cfg.n_ctx}"
    if not cfg.base_url:
        return "loopback:embedded"
    return cfg.base_url.rstrip("/")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def settings_key(cfg, body: dict) -> str:
    """The hash of a tier's request settings (the body without its messages)."""
    rest = {k: v for k, v in body.items() if k != "messages"}
    return _digest({"endpoint": endpoint_identity(cfg), "prompt_version": cfg.prompt_version, "body": rest})


def response_key(cfg, body: dict) -> str:
    """The hash of everything that decides one request's answer."""
    return _digest({"endpoint": endpoint_identity(cfg), "prompt_version": cfg.prompt_version, "body": body})


def prompt_chars(messages: list[dict]) -> int:
    """The characters of a request's messages (the forecast's measure of prompt length)."""
    return sum(len(str(m.get("content") or "")) for m in messages)


def answer_of(result) -> dict:
    """The stored form of a tier's parsed answer."""
    return {k: getattr(result, k) for k in ANSWER_FIELDS}


def tier_settings_key(tier) -> str:
    return settings_key(tier.cfg, tier.request_kwargs([]))


def load_answers(tables, tiers: list) -> int:
    """Give each LLM tier the stored answers of its settings (`tier.responses`); the number loaded."""
    tiers = [t for t in tiers if hasattr(t, "responses")]
    if not tiers or not tables.exists(TABLE):
        return 0
    from pyspark.sql import functions as F

    wanted = {tier_settings_key(t): t for t in tiers}
    rows = (tables.read(TABLE).filter(F.col("settings_key").isin(list(wanted)))
            .select("settings_key", "response_key", "answer").toPandas())
    for skey, rkey, answer in zip(rows["settings_key"], rows["response_key"], rows["answer"]):
        wanted[skey].responses[rkey] = json.loads(answer)
    for tier in tiers:  # two tiers with the same settings share their answers
        for other in tiers:
            if other is not tier and tier_settings_key(other) == tier_settings_key(tier):
                tier.responses.update(other.responses)
    log.info("LLM response cache: %d stored answers for tiers %s", len(rows), [t.name for t in tiers])
    return len(rows)


def new_answers_from_outputs(tier_outputs: Iterable[str], tiers: list) -> list[dict]:
    """The answers a request paid for, from `tier_outputs` JSON (the annotate UDF's way back to the driver)."""
    by_name = {t.name: t for t in tiers if hasattr(t, "responses")}
    out = []
    for text in tier_outputs:
        for name, r in json.loads(text or "{}").items():
            tier = by_name.get(name)
            if tier is None or r.get("cache") != "miss" or r.get("grade") is None or not r.get("response_key"):
                continue
            answer = {k: r.get(k) for k in ANSWER_FIELDS}
            out.append(answer_row(tier, r["response_key"], answer, r.get("prompt_tokens", 0), r.get("completion_tokens", 0),
                                  r.get("prompt_chars", 0)))
    return out


def answer_row(tier, key: str, answer: dict, prompt_tokens: int, completion_tokens: int, chars: int) -> dict:
    return {"prompt_chars": int(chars or 0), "response_key": key, "settings_key": tier_settings_key(tier), "model": tier.cfg.model,
            "endpoint": endpoint_identity(tier.cfg), "prompt_version": tier.cfg.prompt_version,
            "answer": json.dumps(answer, sort_keys=True, default=float), "prompt_tokens": int(prompt_tokens or 0),
            "completion_tokens": int(completion_tokens or 0)}


def store_answered(tables, tiers: list) -> int:
    """Store the answers the tiers paid for in this process (driver-side grading: judge calibrate / eval)."""
    rows = []
    for tier in tiers:
        for key, answer, prompt_tokens, completion_tokens, chars in getattr(tier, "answered", []):
            rows.append(answer_row(tier, key, answer, prompt_tokens, completion_tokens, chars))
        if hasattr(tier, "answered"):
            tier.answered = []
    return store_answers(tables, rows, tiers)


def ensure_created(tables, name: str) -> None:
    """Create the table when missing; a writer that lost the race to create it goes on with the winner's table."""
    try:
        tables.ensure(name)
    except Exception:  # noqa: BLE001 - only a lost creation race is let through
        if not tables.exists(name):
            raise
        log.info("%s was created by another writer at the same time", name)


def store_answers(tables, rows: list[dict], tiers: list) -> int:
    """Insert the new answers (a key already stored is kept as is) and add them to the tiers' in-memory answers."""
    if not rows:
        return 0
    from annomine.schemas import TABLES

    frame = pd.DataFrame(rows).drop_duplicates("response_key")
    frame["stored_at"] = pd.Timestamp.now(tz="UTC").tz_localize(None)
    df = tables.spark.createDataFrame(frame[TABLES[TABLE].columns], schema=TABLES[TABLE].schema)
    ensure_created(tables, TABLE)
    tables.merge(TABLE, df, update=False)
    for tier in tiers:
        if not hasattr(tier, "responses"):
            continue
        skey = tier_settings_key(tier)
        for r in frame.itertuples():
            if r.settings_key == skey:
                tier.responses[r.response_key] = json.loads(r.answer)
    return len(frame)
