"""Batch mode (`annotate.mode: batch`): requests go through the Files and Batches protocol of the loopback server
(in its own process for the kill test), are collected by later runs, and every pair is graded exactly once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import openai
import pytest

from annomine.errors import DamagedInputError
from annomine.judges import batch_store as bs
from annomine.judges.config import LLMTierConfig
from annomine.judges.llm import LLMTier
from annomine.judges.loopback_server import LoopbackLLMServer
from jobs.annotate import run
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


def start_fake_server(*args):
    """`annomine fake-llm-server --port 0` in its own process; (process, base URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "annomine", "fake-llm-server", "--port", "0", *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline()
    found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
    assert found, f"fake-llm-server printed {line!r}"
    return proc, found.group(1)


def server_stats(base_url):
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as resp:
        return json.loads(resp.read())


def annotate_killed_at(conf, step, *args):
    """`annomine annotate` in a subprocess with the batch kill hook at `step`; its exit code."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), ANNOMINE_TEST_KILL_AT_BATCH=step)
    proc = subprocess.run([sys.executable, "-m", "annomine", "annotate", "--conf", str(conf), *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    return proc.returncode, proc.stderr[-2000:]


def test_submit_kill_collect_kill_grades_every_pair_exactly_once(ctx, tmp_path):
    """Killed right after the endpoint created the batch (not yet recorded), then killed while collecting (answers
    stored, requests not yet marked): the next runs adopt the batch and finish it; no request reaches the server twice."""
    expected = seed_tables(ctx, n_queries=3, per_query=8, missing_product=False)
    judge = _tiny_judge(tmp_path / "judge", ctx)
    proc, base_url = start_fake_server()
    try:
        conf, cfg = batch_conf(tmp_path, ctx, base_url, judge)
        code, err = annotate_killed_at(conf, "created")
        assert code == 137, err
        ctx.tables.register_all()
        assert set(ctx.tables.read(bs.BATCHES).toPandas().state) == {"submitting"}
        assert server_stats(base_url)["batch"]["batches"] == 1
        resumed = run(ctx, cfg)                           # adopts the endpoint's batch: nothing is submitted again
        assert resumed["batch"]["adopted"] == 1 and resumed["batch"]["submitted_requests"] == 0 and resumed["missing"] == 0
        assert server_stats(base_url)["batch"]["batches"] == 1
        code, err = annotate_killed_at(conf, "stored", "--collect")
        assert code == 137, err
        ctx.tables.register_all()
        assert (requests_table(ctx).state == "pending").all()
        done = run(ctx, cfg, collect=True)                # the answers are stored already; they are not asked again
        assert done["batch"]["answered"] == done["escalation"]["escalated_pairs"] > 0
        assert done["escalation"]["waiting_for_batch"] == 0 and done["batch"]["submitted_requests"] == 0
        stats = server_stats(base_url)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    escalated = check_all_answered_once(ctx, expected, done["judge_version"])
    req = requests_table(ctx)
    assert (req.state == "answered").all() and (req.attempts == 1).all()
    assert stats["batch"]["by_custom_id"] == {k: 1 for k in req.index}       # no request sent twice
    assert stats["completions"] == len(req) <= len(escalated) and stats["requests"] == 0
    assert ctx.tables.read("llm_responses").count() == len(req)


def run_batch_like_vllm(requests_path, out_path, base_url):
    """What `python -m vllm.entrypoints.openai.run_batch -i in.jsonl -o out.jsonl` does, over the loopback server's
    online endpoint: each request line answered, one output line per custom_id."""
    with open(requests_path) as src, open(out_path, "w") as out:
        for line in src:
            req = json.loads(line)
            http = urllib.request.Request(base_url + "/chat/completions", data=json.dumps(req["body"]).encode(),
                                          headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(http, timeout=10) as resp:
                body = json.loads(resp.read())
            out.write(json.dumps({"id": f"vllm-{req['custom_id'][:8]}", "custom_id": req["custom_id"],
                                  "response": {"status_code": 200, "request_id": "r", "body": body}, "error": None}) + "\n")


def test_requests_written_for_vllm_run_batch_are_collected_from_its_output_file(ctx, tmp_path):
    expected = seed_tables(ctx, n_queries=2, per_query=8, missing_product=False)
    judge = _tiny_judge(tmp_path / "judge", ctx)
    with LoopbackLLMServer() as srv:
        _, cfg = batch_conf(tmp_path, ctx, srv.base_url, judge, target="file")
        first = run(ctx, cfg)
        batches = ctx.tables.read(bs.BATCHES).toPandas()
        assert list(batches.state) == ["written"] and srv.stats["requests"] == 0 and srv.stats["batch"]["files"] == 0
        out = tmp_path / "out.jsonl"
        run_batch_like_vllm(batches.input_file.iloc[0], out, srv.base_url)
        out.write_text(out.read_text() + "not json\n")
        with pytest.raises(DamagedInputError, match=r"out\.jsonl: line \d+ is not JSON"):
            run(ctx, cfg, collect=True, batch_results=str(out))
        out.write_text("".join(out.read_text().splitlines(keepends=True)[:-1]))
        done = run(ctx, cfg, collect=True, batch_results=str(out))
        assert done["batch"]["answered"] == first["batch"]["submitted_requests"] == srv.stats["completions"]
    check_all_answered_once(ctx, expected, done["judge_version"])
    assert list(ctx.tables.read(bs.BATCHES).toPandas().state) == ["collected"]


def test_a_line_failing_max_attempts_times_fails_its_pair_and_a_later_run_tries_again(ctx, tmp_path):
    seed_tables(ctx, n_queries=3, per_query=8, missing_product=False)
    judge = _tiny_judge(tmp_path / "judge", ctx)
    with LoopbackLLMServer(batch_fail="oak", batch_fail_times=10) as srv:
        _, cfg = batch_conf(tmp_path, ctx, srv.base_url, judge, wait_s=10)
        cfg.cascade.tier2.max_attempts = 2
        cfg.max_tier_failure_share = 1.0
        run(ctx, cfg)                                       # submitted
        run(ctx, cfg, collect=True)                         # oak lines fail once, sent again
        last = run(ctx, cfg, collect=True)                  # fail twice: their pairs get the error
        df = annotations(ctx)
        failed = df[df.error.notna()]
        assert len(failed) == last["batch"]["gave_up"] > 0 and last["batch"]["submitted_requests"] == 0
        assert failed.error.str.fullmatch(r"tier2: batch: HTTP 500: server error \(chosen line\) \(after 2 batch attempt\(s\)\)").all()
        req = requests_table(ctx)
        assert (req.state == "gave_up").sum() == last["batch"]["gave_up"]
        again = run(ctx, cfg)                               # annotate.max_attempts: the failed pairs are tried again
        assert again["missing"] == len(failed) and again["batch"]["submitted_requests"] == last["batch"]["gave_up"]
        req = requests_table(ctx)
        assert (req[req.state == "pending"].attempts == 1).all() and (req.state == "pending").sum() == last["batch"]["gave_up"]
