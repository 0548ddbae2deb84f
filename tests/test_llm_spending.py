"""Paying for LLM grades once: the response cache (`llm_responses`), counted at the loopback server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from annomine.judges.config import LLMTierConfig
from annomine.judges.llm import LLMTier, TierResult
from annomine.judges.loopback_server import LoopbackLLMServer
from annomine.judges.response_cache import response_key
from jobs.annotate import TierFailureError, run
from tests.conftest import printed_summary, run_concurrently
from tests.test_annotate import GRADES, annotations, llm_cascade_conf, make_cfg, seed_tables


def own_schema(tmp_path) -> str:
    """A schema of the test's own: the engine's catalog outlives a test, and a judge command writes tables."""
    return "t_" + tmp_path.name.replace("-", "_")


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
        _, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 7, "partitions": 2})
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
            _, cfg_t1 = make_cfg(tmp_path, ctx.project, {"cascade": casc_t1, "chunk_size": 7})
            retrained = run(ctx, cfg_t1)
            assert retrained["escalation"]["escalated_pairs"] > 0 and retrained["llm_requests"] == 0
            assert srv.stats["completions"] == paid
        assert len(ctx.tables.read("llm_responses").toPandas()) == paid


def _priced(casc, tier3=None):
    """Tier 1 + one priced LLM tier (USD per million tokens) on the test's loopback server."""
    price = {"input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 4000.0, "batch_discount": 0.5}
    return {**casc, "tier2": {**casc["tier2"], **price}, "tier3": tier3}


def test_dry_run_forecast_agrees_with_the_real_run_s_ledger(ctx, tmp_path):
    seed_tables(ctx, n_queries=4, per_query=6, missing_product=False)
    judge = tiny_judge(tmp_path / "judge", ctx, 3)
    with LoopbackLLMServer() as srv:
        casc = _priced({**llm_cascade_conf(base_url=srv.base_url), "tier1": True, "judge": str(judge)})
        _, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 7, "limit": 6})
        run(ctx, cfg)                                          # one query graded: the tokens per request are on record
        before = srv.stats["completions"]
        cfg.limit = None
        fc = run(ctx, cfg, dry_run=True)["forecast"]
        assert srv.stats["completions"] == before and fc["pairs"] == 18          # no request, no write
        assert len(annotations(ctx)) == 6
        real = run(ctx, cfg)
        ledger = ctx.tables.read("llm_ledger").toPandas().set_index("run_id").loc[real["run_id"]]
        assert ledger.requests == srv.stats["completions"] - before == real["cost"]["per_tier"]["tier2"]["requests"]
        assert fc["escalate"] == real["escalation"]["escalated_pairs"] == fc["tiers"]["tier2"]["requests"] > 0
        for field in ("prompt_tokens", "completion_tokens"):
            assert abs(fc["tiers"]["tier2"][field] - ledger[field]) <= 0.1 * ledger[field], (field, fc, ledger)
        assert abs(fc["usd"] - ledger.usd) <= 0.1 * ledger.usd and ledger.usd == real["cost"]["usd"] > 0
        expected = (ledger.prompt_tokens * 1000.0 + ledger.completion_tokens * 4000.0) / 1e6
        assert ledger.usd == pytest.approx(expected)
        assert real["cost"]["per_tier"]["tier2"]["usd_if_batch"] == pytest.approx(ledger.usd / 2, abs=1e-6)
        assert fc["tiers"]["tier2"]["usd_if_batch"] == pytest.approx(fc["tiers"]["tier2"]["usd"] / 2, abs=1e-6)


def test_max_cost_stops_the_run_at_its_budget(ctx, tmp_path):
    seed_tables(ctx, n_queries=4, per_query=6, missing_product=False)
    judge = tiny_judge(tmp_path / "judge", ctx, 4)
    with LoopbackLLMServer() as srv:
        casc = _priced({**llm_cascade_conf(base_url=srv.base_url), "tier1": True, "judge": str(judge)})
        _, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc, "chunk_size": 5,
                                                  "max_cost": 1.0})
        first = run(ctx, cfg)
        spent = first["cost"]["usd"]
        assert 0 < spent <= 1.0 and first["escalation"]["stopped_by"] == "max_cost"
        assert first["escalation"]["deferred_by_budget"] > 0 and srv.stats["completions"] == first["escalation"]["llm_calls"]
        cfg.max_cost, cfg.log_mlflow = None, True              # the rest, least sure first, by the next run
        rest = run(ctx, cfg)
        assert rest["escalation"]["deferred_by_budget"] == 0 and rest["cost"]["usd"] > 0
        import mlflow

        mlflow.set_tracking_uri(ctx.project.tracking_uri)
        logged = mlflow.get_run(rest["mlflow_run_id"]).data.metrics
        assert logged["usd"] == pytest.approx(rest["cost"]["usd"]) and logged["llm_requests.tier2"] == rest["escalation"]["llm_calls"]
        assert logged["llm_cache_hits.tier2"] == rest["cost"]["per_tier"]["tier2"]["cache_hits"]
        assert first["escalation"]["llm_calls"] + rest["escalation"]["llm_calls"] == srv.stats["completions"]
    unpriced = llm_cascade_conf(base_url="https://api.example.com/v1")
    with pytest.raises(Exception, match=r"max_cost needs a price for cascade.tier2 \(rule-small\)"):
        make_cfg(tmp_path, ctx.project, {"cascade": {**unpriced, "tier2": {**unpriced["tier2"], "api_key_env": "K"}},
                                         "max_cost": 1.0})


def judge_on_label_files(tmp_path, n_queries: int, seed: int, version: str):
    """Label files of a small shop and a tiny tier-1 judge saved with a median-confidence calibration: the judge
    CLI's `--queries/--labels/--products` arguments and the judge folder."""
    import numpy as np
    import torch

    from annomine.judges.calibration import Calibrator
    from annomine.judges.cross_encoder import CrossEncoderModel, build_encoder
    from annomine.judges.data import load_pairs_from_files
    from tests.test_judge import _shop

    shop = _shop(tmp_path / "shop", n_queries=n_queries, per_query=8)
    files = ["--queries", str(shop / "queries.tsv"), "--labels", str(shop / "labels.tsv"), "--products", str(shop / "products.tsv")]
    pairs = load_pairs_from_files(shop / "queries.tsv", shop / "labels.tsv", shop / "products.tsv")
    torch.manual_seed(seed)
    model = CrossEncoderModel(*build_encoder("tiny"), GRADES, max_length=32, version=version)
    folder = tmp_path / "judge"
    model.save(folder)
    conf = model.predict_proba(pairs["query"].tolist(), pairs["text"].tolist()).max(axis=1)
    Calibrator.uncalibrated(GRADES, float(np.median(conf))).save(folder / "calibration_tier1.json")
    return files, folder


def test_judge_eval_follows_the_spending_rule(tmp_path, monkeypatch, capsys):
    """`judge eval --split all` on outside label files: no request when calibration kept no combination with the LLM
    tier; with `escalate: always` at most `--llm-budget` calls, and the forecast is printed before the first one."""
    from annomine.judges import spending
    from annomine.judges.cascade import Cascade
    from annomine.judges.combiner import Combiner
    from jobs import judge
    from jobs.judge import JudgeConfig

    files, folder = judge_on_label_files(tmp_path, n_queries=6, seed=5, version="ce-eval")
    seen = []
    monkeypatch.setattr(spending, "announce", lambda command, fc: seen.append((command, srv.stats["completions"], fc)))
    with LoopbackLLMServer() as srv:
        path = tmp_path / "conf.yaml"
        path.write_text(json.dumps({"project": {"warehouse": str(tmp_path / "wh"), "mlflow_experiment": "t",
                                                "schema": own_schema(tmp_path)},
                                    "judge": {"ranking_baseline": None, "cascade": {"tier1": True, "tier2": {
                                        "model": "rule-small", "base_url": srv.base_url}}}}))
        from annomine.config import load_job_config

        cfg = load_job_config(path, "judge", JudgeConfig)[1]
        with Cascade.open(cfg.cascade, folder, GRADES, tmp_path / "wh") as cascade:
            Combiner(GRADES, {}, {}).save(cascade.combiner_path())   # calibration kept no combination with tier 2
        assert judge.main(["eval", "--conf", str(path), *files, "--judge", str(folder), "--split", "all"]) == 0
        out = printed_summary(capsys, tmp_path / "wh", "judge_eval")
        assert srv.stats["requests"] == 0 and out["llm_calls"] == 0 and out["n_pairs"] == 48
        assert "kept no combination" in out["forecast"]["skipped"] and out["forecast"]["tiers"]["tier2"]["requests"] == 0
        assert out["deferred_by_budget_rate"] > 0 and seen[-1][:2] == ("judge eval", 0)

        always = ["--set", "judge.escalate=always", "--llm-budget", "5"]
        assert judge.main(["eval", "--conf", str(path), *files, "--judge", str(folder), *always]) == 0
        out = printed_summary(capsys, tmp_path / "wh", "judge_eval")
        assert srv.stats["completions"] == out["llm_calls"] == 5 == out["forecast"]["tiers"]["tier2"]["requests"]
        assert seen[-1][1] == 0 and seen[-1][2]["escalate"] > 5          # printed before the first request
        assert out["llm_cache"]["cost"]["per_tier"]["tier2"]["requests"] == 5
        assert judge.main(["eval", "--conf", str(path), *files, "--judge", str(folder), *always]) == 0
        again = printed_summary(capsys, tmp_path / "wh", "judge_eval")                     # the same 5 from the cache, 5 more paid for
        assert again["llm_cache"]["per_tier"]["tier2"] == {"hits": 5, "misses": 5} and srv.stats["completions"] == 10


def test_a_local_model_server_starts_only_when_a_request_will_be_made(ctx, tmp_path, monkeypatch):
    """annotate with a `server: local` tier whose combination calibration rejected: no request, so no server."""
    from annomine.judges import local_models
    from annomine.judges.cascade import Cascade
    from annomine.judges.combiner import Combiner
    from annomine.judges.local_server import LocalLLMServer

    try:
        local_models.resolve_model("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 - the packaged model is part of `make install`
        pytest.skip(f"smollm2-135m is not installed: {exc}")
    started = []
    monkeypatch.setattr(LocalLLMServer, "start", lambda self: started.append(self.alias) or self)
    seed_tables(ctx, n_queries=2, per_query=4, missing_product=False)
    judge = tiny_judge(tmp_path / "judge", ctx, 6)
    casc = {"tier1": True, "judge": str(judge), "tier2": {"model": "smollm2-135m", "server": "local"}}
    _, cfg = make_cfg(tmp_path, ctx.project, {"cascade": casc})
    with Cascade.open(cfg.cascade, judge, GRADES, ctx.project.warehouse, start_local=False) as cascade:
        assert started == [] and cascade.local_servers[0].port      # its port is known, it is not started
        Combiner(GRADES, {}, {}).save(cascade.combiner_path())
    stats = run(ctx, cfg)
    assert started == [] and "skipped" in stats["escalation"] and stats["escalation"]["deferred_by_budget"] > 0
    cfg.escalate = "always"                                            # now pairs go up: the server is started first
    monkeypatch.setattr(LLMTier, "grade_many", lambda self, pairs, concurrency: [TierResult(error="x") for _ in pairs])
    with pytest.raises(TierFailureError, match="tier2 failed"):                # no real request: only the start matters
        run(ctx, cfg)
    assert started == ["smollm2-135m"]


# ---- the teacher pilot ----

def test_pilot_verdict_from_the_paired_ci():
    from annomine.judges.pilot import CANNOT, EXPECTED, UNSURE, verdict

    def ranking(mean, low, high, n=40):
        return {"n_queries": n, "diff": {"mean": mean, "ci_low": low, "ci_high": high}}

    assert verdict(ranking(0.05, 0.01, 0.09))["verdict"] == EXPECTED
    assert verdict(ranking(-0.02, -0.05, 0.0))["verdict"] == CANNOT
    unsure = verdict(ranking(0.01, -0.01, 0.03))                 # half-width 0.02 over a 0.01 gain: 4x the queries
    assert unsure["verdict"] == UNSURE and unsure["more_labelled_queries"] == 120
    assert verdict(ranking(0.0, -0.01, 0.01))["more_labelled_queries"] is None
    assert verdict(ranking(None, None, None, n=0))["verdict"] == UNSURE


def test_pilot_says_a_teacher_with_the_encoder_s_order_cannot_help_and_one_from_the_human_labels_can():
    """The pilot's decision path (its ranking check and verdict) on a labelled sample: a teacher whose scores are the
    zero-shot encoder's own cosines adds nothing; one that knows the human grades orders the products better."""
    from annomine.judges.pilot import CANNOT, EXPECTED, verdict
    from annomine.judges.stack import BiEncoder
    from jobs.judge import _ranking

    rng = np.random.default_rng(3)
    rows = []
    for q in range(40):
        thing = f"item{q}"
        for j in range(8):
            grade = int(rng.integers(1, 5))  # the human grade; the texts share words with the query at random
            text = f"{thing} {'blue ' * int(rng.integers(0, 3))}product {j}" if rng.random() < 0.6 else f"other {j}"
            rows.append((f"q{q}", f"{thing} blue", f"p{q}_{j}", text, grade))
    sample = pd.DataFrame(rows, columns=["query_id", "query", "product_id", "text", "grade"])
    encoder = BiEncoder("tiny")
    own_order = encoder.cosine(sample["query"].tolist(), sample["text"].tolist())
    same = _ranking(sample, np.asarray(own_order, dtype=float), encoder, [1, 2, 3, 4], seed=13)
    assert same["diff"]["mean"] == pytest.approx(0.0) and verdict(same)["verdict"] == CANNOT
    knows = _ranking(sample, sample["grade"].to_numpy(dtype=float), encoder, [1, 2, 3, 4], seed=13)
    assert knows["diff"]["ci_low"] > 0 and verdict(knows)["verdict"] == EXPECTED


def test_stratified_sample_keeps_every_stratum():
    import pandas as pd

    from annomine.judges.pilot import channels_of, stratified_sample

    pdf = pd.DataFrame({"level": [1] * 90 + [5] * 10, "segment": ["head"] * 50 + ["tail"] * 50,
                        "rank_lexical": [1.0] * 95 + [None] * 5, "rank_ann": [None] * 60 + [2.0] * 40})
    pdf["channels"] = channels_of(pdf)
    assert set(pdf.channels) == {"lexical", "lexical+ann", "ann"}
    sample = stratified_sample(pdf, 20, seed=1)
    strata = lambda d: set(map(tuple, d[["level", "segment", "channels"]].astype(str).values))  # noqa: E731
    assert strata(sample) == strata(pdf) and 18 <= len(sample) <= 22
    assert sample.equals(stratified_sample(pdf, 20, seed=1))


def seed_labelled(ctx, n_queries=8, per_query=6):
    """queries, products, mined candidates (levels, segments, channels) and human grades that follow word overlap."""
    from annomine.schemas import TABLES
    from tests.test_annotate import THINGS, _row

    products, cands, labels, queries = [], [], [], []
    for q in range(n_queries):
        query = THINGS[q % len(THINGS)] + f" {q}"
        queries.append(_row("queries", query_id=f"q{q}", query=query, segment=["head", "tail"][q % 2], origin="labelled"))
        for j in range(per_query):
            pid = f"p{q}_{j}"
            text = {0: f"{query} premium", 1: THINGS[q % len(THINGS)], 2: THINGS[(q + 1) % len(THINGS)]}[j % 3] + f" item {j}"
            products.append(_row("products", product_id=pid, title=text, text=text))
            cands.append(_row("mined_candidates", query_id=f"q{q}", query=query, product_id=pid, level=1 + j % 3,
                              segment=["head", "tail"][q % 2], rank_lexical=j + 1 if j % 2 else None, rank_ann=j + 1))
            labels.append(_row("human_labels", query_id=f"q{q}", product_id=pid, grade=[4, 2, 1][j % 3]))
    for name, rows in (("queries", queries), ("products", products), ("mined_candidates", cands), ("human_labels", labels)):
        ctx.tables.overwrite(name, ctx.spark.createDataFrame(rows, TABLES[name].schema))


def test_judge_pilot_grades_a_stratified_sample_and_gives_a_verdict_beside_the_forecast(ctx, tmp_path, capsys):
    from jobs import judge

    from annomine.judges.data import assign_splits

    seed_labelled(ctx, n_queries=24)
    folder = tiny_judge(tmp_path / "judge", ctx, 7)
    with LoopbackLLMServer() as srv:
        path = tmp_path / "conf.yaml"
        path.write_text(json.dumps({"project": {"warehouse": ctx.project.warehouse, "schema": ctx.project.schema,
                                                "mlflow_experiment": "t"},
                                    "judge": {"ranking_baseline": "tiny", "cascade": {"tier1": True, "tier2": {
                                        "model": "rule-small", "base_url": srv.base_url,
                                        "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}}}}))
        assert judge.main(["pilot", "--conf", str(path), "--judge", str(folder), "--pairs", "24"]) == 0
        captured = capsys.readouterr()
        summary = Path(ctx.project.warehouse).resolve() / "runs" / "judge_pilot_summary.json"
        out = json.loads(summary.read_text())
        paid = srv.stats["completions"]
    sample = out["sample"]
    # only the queries tier 1 never trained on: the judge's calibration and dev queries, never a test query
    splits = assign_splits(pd.DataFrame({"query_id": [f"q{q}" for q in range(24)]}), 0.25, ctx.project.seed)
    unseen = int(splits.isin(["calibration", "dev"]).sum())
    assert 4 <= unseen < 24 and sample["population_pairs"] == 6 * unseen
    assert sample["query_splits"] == sorted(set(splits[splits.isin(["calibration", "dev"])]))
    strata = {(s["level"], s["segment"], s["channels"]) for s in sample["strata"]}
    assert {lvl for lvl, _, _ in strata} == {1, 2, 3} and {ch for _, _, ch in strata} == {"ann", "lexical+ann"}
    assert sample["pairs"] == min(24, 6 * unseen) and sample["queries"] <= unseen
    assert out["agreement"]["n_graded"] == sample["pairs"] and 0 < paid == out["agreement"]["llm_calls"]
    assert out["ranking"]["n_queries"] >= 2 and out["verdict"]["verdict"] in ("expected to help", "cannot help",
                                                                              "not enough evidence")
    full = out["full_run_forecast"]  # scaled to every mined candidate: what a full annotate run grades
    assert sample["mined_candidates"] == 24 * 6
    assert full["extrapolated_from_sample_by"] == pytest.approx(24 * 6 / sample["pairs"], abs=1e-3)
    assert full["tiers"]["tier2"]["usd"] is not None and full["escalate"] >= out["agreement"]["llm_calls"]
    line = captured.out.strip()  # one line for a person, naming the summary file
    assert line.startswith(f"teacher pilot: {out['verdict']['verdict']}") and "full run:" in line and str(summary) in line


def test_judge_pilot_without_labelled_candidates_is_one_line_naming_the_tables(ctx, tmp_path):
    import subprocess
    import sys

    from tests.test_annotate import ROOT

    seed_labelled(ctx, n_queries=2, per_query=3)
    ctx.tables.overwrite("human_labels", ctx.tables.empty("human_labels"))
    path = tmp_path / "conf.yaml"
    path.write_text(json.dumps({"project": {"warehouse": ctx.project.warehouse, "schema": ctx.project.schema},
                                "judge": {"ranking_baseline": "tiny", "cascade": {"tier1": False, "tier2": {"model": "m"},
                                                                                 "loopback": {"embedded": True}}}}))
    proc = subprocess.run([sys.executable, "-m", "annomine", "judge", "pilot", "--conf", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "judge pilot" in line]
    assert len(lines) == 1 and "mined_candidates" in lines[0] and "human_labels" in lines[0]


def test_judge_calibrate_prints_its_forecast_first_and_grades_only_what_max_cost_pays_for(tmp_path, monkeypatch, capsys):
    from annomine.judges import spending
    from jobs import judge

    files, folder = judge_on_label_files(tmp_path, n_queries=16, seed=8, version="ce-cal")
    seen = []
    monkeypatch.setattr(spending, "announce", lambda command, fc: seen.append((command, srv.stats["requests"], fc)))
    with LoopbackLLMServer() as srv:
        path = tmp_path / "conf.yaml"
        tier = {"model": "rule-small", "base_url": srv.base_url, "input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 4000.0}
        path.write_text(json.dumps({"project": {"warehouse": str(tmp_path / "wh"), "mlflow_experiment": "t",
                                                "schema": own_schema(tmp_path)},
                                    "judge": {"ranking_baseline": None, "max_cost": 2.0, "llm_calibration_pairs": 30,
                                              "target_agreement": 0.8, "cascade": {"tier1": True, "tier2": tier}}}))
        assert judge.main(["calibrate", "--conf", str(path), *files, "--judge", str(folder)]) == 0
        out = printed_summary(capsys, tmp_path / "wh", "judge_calibrate")
        command, before, fc = seen[-1]
        assert command == "judge calibrate" and before == 0                   # the forecast came before any request
        planned = fc["llm_calibration_pairs_under_max_cost"]
        assert 0 < planned < fc["escalate"] <= 30 and out["tier2"]["graded"] == planned     # pairs, duplicates included
        assert 0 < srv.stats["completions"] <= planned
        assert 0 < out["llm_cache"]["cost"]["usd"] <= 2.0 and out["llm_cache"]["stored"] == srv.stats["completions"]


def test_concurrent_writers_store_each_answer_once_and_keep_the_first(ctx):
    """Tasks that paid for the same answers at once (a retried task, two commands): one row per key, the first kept."""

    from annomine.judges.response_cache import answer_row, store_answers

    cfg = LLMTierConfig(model="m", base_url="https://api.example.com/v1", api_key_env="K")
    tier = LLMTier("tier2", cfg, GRADES, cfg.base_url, "k")
    keys = [tier.response_key("q", f"product {i}") for i in range(12)]
    errors = []

    def writer(w):
        rows = [answer_row(tier, key, {"grade": 1 + (i + w) % 4}, 10, 2, 40) for i, key in enumerate(keys[w * 3:w * 3 + 6])]
        try:
            store_answers(ctx.tables, rows, [tier])
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(str(exc)[:200])

    run_concurrently(writer, 3)
    stored = ctx.tables.read("llm_responses").toPandas()
    assert errors == [] and len(stored) == 12 and stored.response_key.is_unique and set(stored.response_key) == set(keys)
    before = stored.set_index("response_key").answer
    store_answers(ctx.tables, [answer_row(tier, keys[0], {"grade": 4, "changed": True}, 1, 1, 1)], [tier])
    assert ctx.tables.read("llm_responses").toPandas().set_index("response_key").answer[keys[0]] == before[keys[0]]
