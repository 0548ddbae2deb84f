"""Batch mode (`annotate.mode: batch`): requests go through the Files and Batches protocol of the loopback server
(in its own process for the kill test), are collected by later runs, and every pair is graded exactly once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from annomine.judges import batch_store as bs
from annomine.judges.config import LLMTierConfig
from annomine.judges.llm import LLMTier
from annomine.judges.loopback_server import LoopbackLLMServer, rule_grade
from jobs.annotate import AnnotateConfig, run
from tests.test_annotate import GRADES, KEY, ROOT, _tiny_judge, annotations, check_exactly_once, llm_cascade_conf, make_cfg, seed_tables


def batch_conf(tmp_path, ctx, base_url, judge, **batch):
    casc = llm_cascade_conf(base_url=base_url, max_attempts=3)
    casc.update(tier1=True, judge=str(judge), tier3=None)
    return make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 10, "partitions": 1, "mode": "batch",
                                            "batch": {"poll_s": 0.05, **batch}})


def requests_table(ctx):
    return ctx.tables.read(bs.REQUESTS).toPandas().set_index("custom_id")


def check_all_answered_once(ctx, expected, version):
    """Every pair once; no pair waits; each escalated pair decided with tier 2's batch answer, the rule's grade."""
    df = annotations(ctx)
    check_exactly_once(df, expected, version, ghost=False)
    assert not df.escalation.isin(["batch", "budget"]).any() and df.error.isna().all()
    escalated = df[df.escalation == "escalated"]
    assert len(escalated)
    for qid, pid, outs in zip(escalated.query_id, escalated.product_id, escalated.tier_outputs):
        t2 = json.loads(outs)["tier2"]
        assert t2["cache"] == "hit" and t2["grade"] == expected[(qid, pid)] and t2["confidence_source"] == "logprobs"
    return escalated


def test_batch_answers_are_the_online_answers():
    """A batch line is answered by the same completion logic as an online request: same grade, same distribution."""
    tier = LLMTier("tier2", LLMTierConfig(model="rule-small"), GRADES, "http://127.0.0.1:1/v1", "x")
    body = tier.request_kwargs(tier.messages("red running shoes", "Nike red running shoes"))
    with LoopbackLLMServer() as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        online = c.chat.completions.create(**body).model_dump()
        line = json.dumps({"custom_id": "k1", "method": "POST", "url": "/v1/chat/completions", "body": body})
        uploaded = c.files.create(file=("in.jsonl", line.encode()), purpose="batch")
        batch = c.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        states = [batch.status] + [c.batches.retrieve(batch.id).status for _ in range(3)]
        done = c.batches.retrieve(batch.id)
        out = json.loads(c.files.content(done.output_file_id).text)
    assert states == ["validating", "in_progress", "completed", "completed"]
    assert done.error_file_id is None and done.request_counts.completed == 1 and out["custom_id"] == "k1"
    answer = out["response"]["body"]["choices"][0]
    assert out["response"]["status_code"] == 200
    assert answer["message"]["content"] == online["choices"][0]["message"]["content"]
    tops = lambda lp: [(t["token"], t["logprob"], [(a["token"], a["logprob"]) for a in t["top_logprobs"]]) for t in lp["content"]]
    assert tops(answer["logprobs"]) == tops(online["choices"][0]["logprobs"])
    assert srv.stats["batch"]["by_custom_id"] == {"k1": 1}


def test_failed_lines_are_recorded_and_sent_again_by_the_next_submit(ctx, tmp_path):
    expected = seed_tables(ctx, n_queries=3, per_query=8, missing_product=False)
    judge = _tiny_judge(tmp_path / "judge", ctx)
    with LoopbackLLMServer(batch_fail="oak") as srv:
        _, cfg = batch_conf(tmp_path, ctx, srv.base_url, judge)
        first = run(ctx, cfg)                                      # tier 1 grades, unsure pairs queued and submitted
        assert srv.stats["completions"] == 0 and first["batch"]["submitted_requests"] > 0
        df = annotations(ctx)
        waiting = df[df.escalation == "batch"]
        assert len(waiting) and waiting.grade.notna().all() and (waiting.deciding_tier == "tier1").all()
        assert first["escalation"]["waiting_for_batch"] == len(waiting)
        cfg.batch.wait_s = 10                                       # collect: oak lines fail and are sent again
        second = run(ctx, cfg, collect=True)
        assert second["missing"] == 0 and second["batch"]["failed_lines"] > 0
        req = requests_table(ctx)
        failed_once = req[req.attempts == 2]
        assert len(failed_once) == second["batch"]["failed_lines"] == second["batch"]["submitted_requests"]
        assert (failed_once.state == "pending").all()
        oak = df[df.query_id.isin(["q1"])]                          # the oak table query's escalated pairs wait again
        assert (annotations(ctx).set_index(KEY).loc[list(zip(oak.query_id, oak.product_id))].escalation != "escalated").any()
        third = run(ctx, cfg, collect=True)
        assert third["batch"]["answered"] == len(failed_once)
        seen = srv.stats["batch"]["by_custom_id"]
    check_all_answered_once(ctx, expected, first["judge_version"])
    req = requests_table(ctx)
    assert (req.state == "answered").all()
    assert all(seen[k] == req.attempts[k] for k in req.index) and set(seen) == set(req.index)   # failed ones twice, the rest once
    assert sorted(set(seen.values())) == [1, 2]
