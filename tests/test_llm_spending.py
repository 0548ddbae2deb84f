"""Paying for LLM grades once: the response cache (`llm_responses`), counted at the loopback server."""

from __future__ import annotations

import json

from annomine.judges.config import LLMTierConfig
from annomine.judges.llm import LLMTier
from annomine.judges.loopback_server import LoopbackLLMServer
from annomine.judges.response_cache import response_key
from jobs.annotate import run
from tests.test_annotate import GRADES, annotations, llm_cascade_conf, make_cfg, seed_tables


def tiny_judge(folder, ctx, seed: int):
    """A random tiny tier 1 (its version names the seed) whose threshold is the median confidence: half escalate."""
    import numpy as np
    import torch

    from annomine.judges.calibration import Calibrator
    from annomine.judges.cross_encoder import CrossEncoderModel, build_encoder

    torch.manual_seed(seed)
    tok, bert = build_encoder("tiny")
    model = CrossEncoderModel(tok, bert, GRADES, max_length=32, version=f"ce-tiny-{seed}")
    model.save(folder)
    pdf = ctx.tables.read("mined_candidates").join(ctx.tables.read("products"), "product_id").select("query", "text").toPandas()
    conf = model.predict_proba(pdf["query"].tolist(), pdf["text"].tolist()).max(axis=1)
    Calibrator.uncalibrated(GRADES, float(np.median(conf))).save(folder / "calibration_tier1.json")
    return folder


def test_response_key_covers_what_decides_the_answer_and_never_the_key():
    base = LLMTierConfig(model="m", base_url="https://api.example.com/v1", api_key_env="K")
    tier = LLMTier("tier2", base, GRADES, base.base_url, "sk-secret-1")
    same_but_key = LLMTier("tier2", base, GRADES, base.base_url, "sk-other-2")
    key = tier.response_key("red shoes", "red shoes item")
    assert key == same_but_key.response_key("red shoes", "red shoes item")            # the API key is not part of it
    assert key != tier.response_key("red shoes", "blue shoes item")                    # the messages are
    for change in ({"model": "m2"}, {"temperature": 0.5}, {"max_tokens": 50},
                   {"logprobs": False}, {"response_format": "none"}, {"base_url": "https://other/v1"}):
        cfg = LLMTierConfig(**{**base.__dict__, **change})
        other = LLMTier("tier2", cfg, GRADES, cfg.base_url, "k")
        assert other.response_key("red shoes", "red shoes item") != key, change
    body = tier.request_kwargs([{"role": "user", "content": "x"}])
    assert response_key(LLMTierConfig(**{**base.__dict__, "prompt_version": "v2"}), body) != response_key(base, body)
    local = LLMTierConfig(model="qwen", server="local")
    a = response_key(local, LLMTier("t", local, GRADES, "http://127.0.0.1:5001/v1", "k").request_kwargs([]))
    b = response_key(local, LLMTier("t", local, GRADES, "http://127.0.0.1:6002/v1", "k").request_kwargs([]))
    assert a == b                                         # a managed server's port changes every run, its answers do not


def test_no_request_is_paid_twice_across_reruns_and_a_tier1_retrain(ctx, tmp_path):
    seed_tables(ctx, n_queries=3, per_query=6, missing_product=False)
    with LoopbackLLMServer() as srv:
        casc = llm_cascade_conf(base_url=srv.base_url)
        _, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 7, "partitions": 2, "log_mlflow": False})
        first = run(ctx, cfg)
        paid = srv.stats["completions"]
        cache = first["llm_cache"]
        assert paid > 18 and cache["loaded"] == 0 and cache["stored"] == paid            # tier 2 on all 18, tier 3 on some
        assert sum(c["misses"] for c in cache["per_tier"].values()) == paid
        stored = ctx.tables.read("llm_responses").toPandas()
        assert len(stored) == paid and stored.response_key.is_unique
        assert not stored.answer.str.contains("loopback-no-key").any()
        grades = annotations(ctx).set_index(["query_id", "product_id"]).grade

        ctx.tables.overwrite("annotations", ctx.tables.empty("annotations"))               # the grades are lost: grade again
        second = run(ctx, cfg)
        assert srv.stats["completions"] == paid and second["llm_requests"] == 0
        assert second["llm_cache"]["loaded"] == paid and second["llm_cache"]["stored"] == 0
        assert sum(c["hits"] for c in second["llm_cache"]["per_tier"].values()) == paid
        assert second["escalation"]["llm_calls"] == 0
        again = annotations(ctx).set_index(["query_id", "product_id"]).grade
        assert again.sort_index().equals(grades.sort_index())                               # same answers, no request
        hit = json.loads(annotations(ctx).tier_outputs.iloc[0])["tier2"]
        assert hit["cache"] == "hit" and hit["response_key"] in set(stored.response_key)

        for seed in (1, 2):                  # tier 1 trained (and calibrated) anew: a new judge version, no new request
            casc_t1 = {**casc, "tier1": True, "judge": str(tiny_judge(tmp_path / f"judge{seed}", ctx, seed))}
            _, cfg_t1 = make_cfg(tmp_path, ctx.project, {"cascade": casc_t1, "chunk_size": 7, "log_mlflow": False})
            retrained = run(ctx, cfg_t1)
            assert retrained["escalation"]["escalated_pairs"] > 0 and retrained["llm_requests"] == 0
            assert srv.stats["completions"] == paid
        assert len(ctx.tables.read("llm_responses").toPandas()) == paid
