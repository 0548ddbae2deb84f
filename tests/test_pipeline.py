"""Stage skipping: a stage re-runs only when its config, input tables or input files changed."""

from pathlib import Path

from annomine.pipeline_state import PipelineState
from jobs import pipeline
from jobs import stage_files as files
from tests.conftest import write_tsv


def _conf(tmp_path: Path, project) -> Path:
    products = write_tsv(tmp_path / "in" / "products.tsv", ["product_id", "title", "description"],
                         [["p1", "Red Pillow", ""], ["p2", "Blue Mug", "ceramic"]])
    queries = write_tsv(tmp_path / "in" / "queries.tsv", ["query_id", "query"], [["q1", "pillow"]])
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"project: {{warehouse: '{project.warehouse}', schema: {project.schema}}}\n"
        f"ingest: {{products: {{path: '{products}'}}, queries: {{path: '{queries}'}}}}\n"
    )
    return conf


def test_ingest_is_skipped_when_current_and_rerun_when_its_input_changes(tmp_path, project, spark, capsys):
    conf = _conf(tmp_path, project)
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    assert "ingest: running (never ran)" in capsys.readouterr().out

    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    assert "ingest: skipped, current" in capsys.readouterr().out

    with open(tmp_path / "in" / "products.tsv", "a", encoding="utf-8") as fh:
        fh.write("p3\tGreen Lamp\t\n")
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    out = capsys.readouterr().out
    assert "ingest: running (inputs changed" in out and "products.tsv" in out

    pipeline.run_pipeline(str(conf), ["ingest.queries_origin=log"], only=["ingest"])
    assert "ingest: running (inputs changed: config)" in capsys.readouterr().out

    pipeline.run_pipeline(str(conf), ["ingest.queries_origin=log"], only=["ingest"], force=True)
    assert "ingest: running" in capsys.readouterr().out
    state = PipelineState(project.warehouse_path / "pipeline_state.json")
    assert state.state["ingest"]["outputs"]["products"] >= 1
    assert state.state["ingest"]["outcome"] == "products 3, queries 1 rows loaded"  # the closing summary's line


def test_a_missing_output_makes_a_stage_run_again(tmp_path, project, spark, capsys):
    import shutil

    from annomine.tables import TableStore

    conf = _conf(tmp_path, project)
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    shutil.rmtree(TableStore(spark, project).location("products"))
    capsys.readouterr()
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    assert "ingest: running (output table products is missing)" in capsys.readouterr().out


def _run_ingest(conf: Path, *extra: str):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "ANNOMINE_VERBOSE", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run([sys.executable, "-m", "annomine", "ingest", "--conf", str(conf), *extra],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_default_output_has_no_engine_noise_and_verbose_brings_it_back(tmp_path, project):
    conf = _conf(tmp_path, project)
    quiet = _run_ingest(conf)
    assert quiet.returncode == 0, quiet.stderr
    assert "products: 2 rows read, 2 loaded" in quiet.stdout
    noise = ("INFO sail", "WARN sail", "UserWarning", "No Partition Defined", "warnings.warn")
    assert not [line for line in quiet.stderr.splitlines() if any(n in line for n in noise)], quiet.stderr

    loud = _run_ingest(conf, "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert "INFO sail" in loud.stderr and "No Partition Defined" in loud.stderr


def test_pyfunc_definitions_hide_mlflow_s_type_hint_advice_and_nothing_else():
    import warnings

    import mlflow.pyfunc

    from annomine import quiet

    def define():
        class Model(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input

    quiet.apply(False)
    warnings.onceregistry.clear()  # MLflow shows its advice once per process
    with warnings.catch_warnings(record=True) as bare:
        warnings.simplefilter("always")
        define()
    assert any("Add type hints to the `predict` method" in str(w.message) for w in bare)  # what MLflow does
    warnings.onceregistry.clear()
    with warnings.catch_warnings(record=True) as muted:
        warnings.simplefilter("always")
        with quiet.pyfunc_definition_muted():
            define()
            warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in muted] == ["another warning"]


def test_verbose_flag_restores_library_settings(monkeypatch):
    import os
    import warnings

    from annomine import quiet
    from annomine.runtime import job_parser

    for name in (*quiet.QUIET_ENV, "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    try:
        quiet.apply(False)
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and quiet.engine_log_level() == "error"
        assert os.environ["TQDM_DISABLE"] == "1"  # pytest's stderr is not a terminal
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.apply(False)  # catch_warnings reset the filters; apply them again inside
            warnings.warn("WARN WindowExpression: No Partition Defined for Window operation! ...", UserWarning)
        assert not caught
        args = job_parser("annomine x", "").parse_args(["--verbose"])
        assert args.verbose and quiet.is_verbose() and quiet.engine_log_level() == "info"
        assert "TRANSFORMERS_VERBOSITY" not in os.environ and "TQDM_DISABLE" not in os.environ
        monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's own setting wins
        quiet.apply(False)
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    finally:
        quiet.apply(False)


def test_the_closing_summary_is_one_screen_read_back_from_the_files(tmp_path, project, capsys):
    import json

    from annomine.publish import write_pointer
    from annomine.run_summary import write_summary
    from jobs import evaluate

    conf = _conf(tmp_path, project)
    _, cfg = pipeline.load_job_config(str(conf), "evaluate", evaluate.CONFIG_CLASS, [])
    report_file = evaluate.report_path(project, cfg)
    report_file.parent.mkdir(parents=True)
    est = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    metrics = {"ndcg@10": est, "lowest_share@10": {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}}
    per_query = [{"model": m, "query_id": f"q{i}", "ndcg@10": base + 0.01 * i}
                 for m, base in (("bm25", 0.5), ("minilm", 0.4), ("curriculum", 0.7)) for i in range(6)]
    report = {"split": "test", "split_role": "reporting only", "inputs": {"n_queries_evaluated": 6, "n_labels": 60},
              "bootstrap": {"resamples": 200, "confidence": 0.95, "seed": 1}, "per_query": per_query,
              "models": [{"label": "bm25", "spec": {"baseline": True}, "metrics": {"all": metrics}},
                         {"label": "minilm", "spec": {"baseline": True}, "metrics": {"all": metrics}},
                         {"label": "curriculum", "spec": {"baseline": False}, "metrics": {"all": metrics}}]}
    report["teacher"] = {"dev": {"n_queries": 5, "baseline": "minilm", "judge_ndcg@10": {"mean": 0.9},
                                 "baseline_ndcg@10": {"mean": 0.8}, "diff": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15}}}
    report_file.write_text(json.dumps(report))
    write_summary(project, "annotate", {"pairs": 500, "errors": 0, "seconds": 12, "by_tier": {"tier1": 490, "tier2": 10},
                                        "escalation": {"llm_calls": 10, "deferred_by_budget": 40},
                                        "cost": {"per_tier": {"tier2": {"model": "m", "requests": 7, "cache_hits": 3,
                                                                        "prompt_tokens": 2100, "completion_tokens": 70,
                                                                        "usd": 0.0}}}})
    model = project.warehouse_path / "models" / "curriculum" / "model-1"
    model.mkdir(parents=True)
    write_pointer(project.warehouse_path / "models" / "best.json", {"path": str(model), "variant": "curriculum"})
    state = {"ingest": {"seconds": 4.0, "outcome": "products 2 rows loaded"}}
    pipeline.print_outcome(project, str(conf), [], {"ingest": "skipped"}, state)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 40
    assert "  ingest          4s  products 2 rows loaded (current, not re-run)" in lines
    assert sum(line.endswith("-  not run") for line in lines) == len(pipeline.STAGES) - 1
    rows = {line.split()[0]: line for line in lines if line.startswith("  ") and "[" in line}
    assert "reference" in rows["minilm"] and "+0.300 [+0.300, +0.300]" in rows["curriculum"]  # paired, per query
    assert "+0.100 [+0.100, +0.100]" in rows["bm25"] and "free baseline" in rows["bm25"]
    assert "the pipeline's retriever" in rows["curriculum"] and f"pipeline's retriever (curriculum): {model}" in out
    assert "curriculum beats the best baseline without training (bm25): NDCG@10 +0.200" in out
    assert "lowest-grade share@10 left out: 0.0% for every model" in out  # no information, so no column
    assert "the judge as a teacher (5 dev queries): NDCG@10 of its order 0.900 vs minilm 0.800, paired +0.100" in out
    assert "teacher pilot: not run" in out
    assert "tier2 (m): 7 requests, 3 cache hits, 2,100 prompt + 70 completion tokens, USD 0.0000" in out


class _Versions:
    """A table store whose every table is at version 1 (the stages below are judged on their files)."""

    def version(self, name):
        return 1

    def exists(self, name):
        return True


def _check(state: PipelineState, name: str, project, cfg) -> tuple[bool, str]:
    spec = next(s for s in pipeline.STAGES if s.name == name)
    return state.is_current(spec, _Versions(), project, cfg, {})


def _record(state: PipelineState, name: str, project, cfg) -> None:
    spec = next(s for s in pipeline.STAGES if s.name == name)
    state.record(spec, _Versions(), project, cfg, {}, 1.0)


def test_train_and_evaluate_rerun_when_the_shards_or_model_pointers_they_read_change(tmp_path, project):
    from jobs import evaluate, train

    shards, models = project.outputs_path / "shards", project.outputs_path / "models"
    (shards / "curriculum").mkdir(parents=True)
    models.mkdir(parents=True)
    manifest = shards / "curriculum" / "manifest.json"
    manifest.write_text('{"variant": "curriculum", "table_version": 1}')
    (shards / "dev_eval.parquet").write_bytes(b"dev")
    for variant in ("curriculum", "mixed", "best"):
        (models / f"{variant}.json").write_text(f'{{"variant": "{variant}", "path": "{variant}/model"}}')
    state = PipelineState(tmp_path / "pipeline_state.json")
    train_cfg, eval_cfg = train.TrainConfig(variant="curriculum"), evaluate.EvaluateConfig(models=["bm25", "variants"])
    _record(state, "train", project, train_cfg)
    _record(state, "evaluate", project, eval_cfg)
    assert _check(state, "train", project, train_cfg)[0] and _check(state, "evaluate", project, eval_cfg)[0]

    manifest.write_text('{"variant": "curriculum", "table_version": 2}')  # curriculum wrote new shards
    current, why = _check(state, "train", project, train_cfg)
    assert not current and why == f"inputs changed: {[str(manifest)]}"

    (shards / "dev_eval.parquet").write_bytes(b"new dev")
    assert "dev_eval.parquet" in _check(state, "train", project, train_cfg)[1]

    (models / "mixed.json").write_text('{"variant": "mixed", "path": "mixed/model2"}')  # a variant trained again
    current, why = _check(state, "evaluate", project, eval_cfg)
    assert not current and why == f"inputs changed: {[str(models / 'mixed.json')]}"


def test_train_reruns_when_a_baseline_s_shards_change_and_lists_its_pointer(tmp_path, project):
    from jobs import train

    shards, models = project.outputs_path / "shards", project.outputs_path / "models"
    for variant in ("curriculum", "human"):
        (shards / variant).mkdir(parents=True)
        (shards / variant / "manifest.json").write_text(f'{{"variant": "{variant}", "table_version": 1}}')
    cfg = train.TrainConfig(variant="curriculum", baselines=["human", "mixed"])  # mixed: no shards, so not trained
    assert files.train_outputs(project, cfg) == [models / "curriculum.json", models / "human.json"]
    state = PipelineState(tmp_path / "pipeline_state.json")
    _record(state, "train", project, cfg)
    assert _check(state, "train", project, cfg)[0] is False  # its outputs do not exist yet
    models.mkdir(parents=True)
    for variant in ("curriculum", "human"):
        (models / f"{variant}.json").write_text(f'{{"variant": "{variant}"}}')
    _record(state, "train", project, cfg)
    assert _check(state, "train", project, cfg)[0]
    (shards / "human" / "manifest.json").write_text('{"variant": "human", "table_version": 2}')
    assert _check(state, "train", project, cfg) == (False, f"inputs changed: {[str(shards / 'human' / 'manifest.json')]}")


def test_annotate_reruns_when_the_table_its_config_names_changes(tmp_path, project):
    from jobs import annotate

    class Versions(_Versions):
        def __init__(self):
            self.versions = {}

        def version(self, name):
            return self.versions.get(name, 1)

    tables, cfg = Versions(), annotate.AnnotateConfig(source="my_pairs")
    spec = next(s for s in pipeline.STAGES if s.name == "annotate")
    state = PipelineState(tmp_path / "pipeline_state.json")
    state.record(spec, tables, project, cfg, {}, 1.0)
    assert state.is_current(spec, tables, project, cfg, {})[0]
    tables.versions["my_pairs"] = 2
    assert state.is_current(spec, tables, project, cfg, {}) == (False, "inputs changed: ['my_pairs']")


def test_the_pipeline_runs_the_teacher_pilot_before_annotate_and_says_why_when_it_cannot(project, capsys):
    from annomine.closing_summary import llm_lines
    from annomine.run_summary import read_summary
    from jobs.judge import JudgeConfig

    cfg = JudgeConfig(ranking_baseline=None)  # the pilot needs the encoder whose order the teacher must beat
    pipeline._before("mine", project, {"judge": cfg})
    assert read_summary(project, "judge_pilot") is None  # only annotate is preceded by the pilot
    pipeline._before("annotate", project, {"judge": cfg})
    assert "judge pilot: not run: judge pilot needs judge.ranking_baseline" in capsys.readouterr().out
    assert llm_lines(project)[0].startswith("teacher pilot: not run: judge pilot needs judge.ranking_baseline")
    pipeline._before("annotate", project, {"judge": JudgeConfig(ranking_baseline=None, pilot_in_pipeline=False)})
    assert capsys.readouterr().out == ""
