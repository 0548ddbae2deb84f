"""Configuration and input mistakes: one clear line naming the file and key, exit status 2, no traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from annomine.cli import guarded
from annomine.config import ConfigError, load_job_config
from jobs import mine

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "conf" / "local.yaml"


@pytest.mark.parametrize("override, named", [
    ("bogussection.x=1", "bogussection"),
    ("=5", "empty name"),
    ("mine=5", "names no key"),
    ("mine.max_rank=[1,", "mine.max_rank"),
    ("mine.max_rank", "section.key=value"),
])
def test_a_malformed_or_unknown_override_is_an_error_naming_it(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_job_config(LOCAL, "mine", mine.CONFIG_CLASS, [override])


def test_an_unknown_section_in_the_file_is_an_error(tmp_path):
    conf = tmp_path / "conf.yaml"
    conf.write_text("project: {warehouse: wh}\nmien: {max_rank: 5}\nx-shared: &s {a: 1}\n")
    with pytest.raises(ConfigError, match=r"conf.yaml: unknown section\(s\) \['mien'\]"):
        load_job_config(conf, "mine", mine.CONFIG_CLASS)


def test_a_binary_config_file_is_an_error_naming_the_file(tmp_path):
    conf = tmp_path / "model.bin"
    conf.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError, match="model.bin: not a UTF-8 text file"):
        load_job_config(conf, "mine", mine.CONFIG_CLASS)


def test_a_config_error_prints_one_line_and_exits_2(tmp_path, capsys):
    code = guarded("annomine mine", mine.main, ["--conf", str(LOCAL), "--set", "mine.max_rnak=5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("annomine mine: error: ") and "mine: unknown key(s) ['max_rnak']" in first


def test_debug_shows_the_traceback(capsys):
    code = guarded("annomine mine", mine.main, ["--conf", str(LOCAL), "--set", "mine.max_rnak=5", "--debug"])
    assert code == 2 and "Traceback" in capsys.readouterr().err


def test_the_pipeline_checks_every_section_before_running_any(tmp_path, capsys):
    from jobs import pipeline

    with pytest.raises(ConfigError, match=r"evaluate: unknown key\(s\) \['top_kk'\]"):
        pipeline.run_pipeline(str(LOCAL), ["evaluate.top_kk=5", f"project.warehouse={tmp_path / 'wh'}"])
    assert "running" not in capsys.readouterr().out  # nothing ran
    assert not (tmp_path / "wh").exists()


def test_the_cli_itself_prints_one_line_for_a_bad_config(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text("project: {warehouse: wh}\nmine: {max_rank: many}\n")
    out = subprocess.run([sys.executable, "-m", "annomine", "mine", "--conf", str(conf)], capture_output=True,
                         text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "bad.yaml:mine.max_rank: expected an integer, got 'many'" in out.stderr.splitlines()[0]


# ---- settings that cannot mean anything are refused at config time, naming the key -----------------------
@pytest.mark.parametrize("section, override, named", [
    ("evaluate", "evaluate.bootstrap_resamples=0", "evaluate.bootstrap_resamples: must be >= 100, got 0"),
    ("evaluate", "evaluate.encode.batch_size=0", "evaluate.encode.batch_size: must be >= 1, got 0"),
    ("train", "train.lr=-1", "train.lr: must be > 0, got -1.0"),
    ("train", "train.lr_by_loss={bce: 0}", "train.lr_by_loss: must be > 0, got {'bce': 0.0}"),
    ("train", "train.warmup_ratio=1.5", "train.warmup_ratio: must be >= 0 and < 1, got 1.5"),
    ("curriculum", "curriculum.max_group_size=0", "curriculum.max_group_size: must be >= 2, got 0"),
    ("channels", "channels.encode_batch_size=0", "channels.encode_batch_size: must be >= 1, got 0"),
    ("channels", "channels.options={ann: {encode_batch_size: -4}}", "(ann channel).encode_batch_size: must be >= 1, got -4"),
    ("annotate", "annotate.cascade.tier1_batch_size=0", "annotate.cascade.tier1_batch_size: must be >= 1, got 0"),
    ("judge", "judge.model.learning_rate=0", "judge.model.learning_rate: must be > 0, got 0.0"),
    ("mine", "mine.random_max_similarity=nan", "mine.random_max_similarity: must be > 0 and <= 1, got nan"),
    ("ingest", "project.min_grade=5", "project: min_grade (5) must be below max_grade (4)"),
])
def test_a_setting_that_cannot_mean_anything_is_one_line_naming_the_key(section, override, named, capsys):
    module = __import__(f"jobs.{section}", fromlist=["main"])
    action = ["calibrate"] if section == "judge" else []
    code = guarded(f"annomine {section}", module.main, [*action, "--conf", str(LOCAL), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert named in err.splitlines()[0]


def test_bounds_are_declared_on_the_field_and_checked_in_one_place():
    from annomine.bounds import bounded, check_bounds

    @dataclasses.dataclass
    class Knobs:
        share: float = bounded(0.5, ge=0, le=1)
        count: int | None = bounded(None, ge=1)
        rates: dict[str, float] = bounded({}, gt=0)

    assert check_bounds(Knobs()) == []
    assert check_bounds(Knobs(share=1.01, count=0, rates={"a": 1.0, "b": -2.0})) == [
        ("share", "must be >= 0 and <= 1, got 1.01"), ("count", "must be >= 1, got 0"),
        ("rates", "must be > 0, got {'a': 1.0, 'b': -2.0}")]
    assert Knobs().rates is not Knobs().rates  # a mutable default is a fresh copy per instance


def test_every_shipped_config_still_loads(tmp_path):
    from annomine.stages import STAGES

    for conf in sorted((ROOT / "conf").glob("*.yaml")):
        for stage in STAGES:
            module = __import__(stage.module, fromlist=["CONFIG_CLASS"])
            if getattr(module, "CONFIG_CLASS", None) is not None:
                load_job_config(conf, stage.name, module.CONFIG_CLASS)


# ---- inputs and endpoints: one line naming the file, table, key or endpoint, exit 2 ------------------------
def _one_line_error(capsys, prog: str, run) -> str:
    code = guarded(prog, lambda argv: run())
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err.splitlines()[0]


def test_an_ingest_that_quarantines_every_product_names_the_file_and_the_quarantine(ctx, tables, tmp_path, capsys):
    from annomine.sources import SourceConfig
    from jobs import ingest
    from tests.conftest import write_tsv

    products = write_tsv(tmp_path / "products.tsv", ["product_id", "title"], [["p1", ""], ["", "Mug"], ["p3", " "]])
    line = _one_line_error(capsys, "annomine ingest",
                           lambda: ingest.run(ctx, ingest.IngestConfig(products=SourceConfig(str(products)))))
    assert f"{products}: every row was quarantined" in line
    assert f"'{tables.qualified_name('quarantine')}'" in line
    assert tables.read("quarantine").count() == 3  # nothing lost


def test_an_unknown_model_in_evaluate_is_one_line_naming_it(spark, project, tmp_path, capsys):
    from jobs import evaluate
    from tests.conftest import write_tsv

    shop = tmp_path / "shop"
    write_tsv(shop / "products.tsv", ["product_id", "title", "description"], [["p1", "Teapot", ""], ["p2", "Kettle", ""]])
    write_tsv(shop / "queries.tsv", ["query_id", "query", "frequency"], [["q1", "teapot", "5"]])
    write_tsv(shop / "labels.tsv", ["query_id", "product_id", "grade", "variance"], [["q1", "p1", "4", "0"]])
    conf = tmp_path / "eval.yaml"
    conf.write_text(f"project: {{warehouse: {project.warehouse}, schema: {project.schema}}}\nevaluate: {{mlflow: false}}\n")
    code = guarded("annomine evaluate", evaluate.main, [
        "--conf", str(conf), "--models", "bm25,curriculm", "--split", "all", "--products", str(shop / "products.tsv"),
        "--queries", str(shop / "queries.tsv"), "--labels", str(shop / "labels.tsv")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "unknown model 'curriculm'" in err.splitlines()[0]


def test_a_tier_whose_key_variable_is_unset_names_the_variable_and_endpoint(monkeypatch, capsys):
    from annomine.judges.cascade import Cascade
    from annomine.judges.config import CascadeConfig, LLMTierConfig

    monkeypatch.delenv("ANNOMINE_TEST_UNSET_KEY", raising=False)
    cfg = CascadeConfig(tier1=False, tier2=LLMTierConfig(model="m", base_url="https://llm.example/v1",
                                                         api_key_env="ANNOMINE_TEST_UNSET_KEY"))

    def open_cascade():
        with Cascade.open(cfg, None, [1, 2, 3, 4]):
            pass

    line = _one_line_error(capsys, "annomine annotate", open_cascade)
    assert "https://llm.example/v1" in line and "environment variable ANNOMINE_TEST_UNSET_KEY is not set" in line


def test_calibrating_an_unreachable_tier_names_the_endpoint(tmp_path, capsys):
    import pandas as pd

    from annomine.judges.cascade import Cascade, calibrate_cascade
    from annomine.judges.config import CascadeConfig, LLMTierConfig
    from annomine.judges.local_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cfg = CascadeConfig(tier1=False, tier2=LLMTierConfig(model="m", base_url=url, max_attempts=1, timeout_s=2))
    cal = pd.DataFrame({"query_id": ["q1"], "product_id": ["p1"], "query": ["teapot"], "text": ["Teapot"], "grade": [4]})

    def calibrate():
        with Cascade.open(cfg, None, [1, 2, 3, 4], tmp_path / "wh") as cascade:
            calibrate_cascade(cascade, cal)

    line = _one_line_error(capsys, "annomine judge", calibrate)
    assert f"tier2 ({url}): no calibration pair could be graded" in line


def test_training_a_variant_without_shards_names_the_folder_and_the_key(ctx, capsys):
    from jobs import train

    cfg = train.TrainConfig(variant="human", mlflow=False)
    line = _one_line_error(capsys, "annomine train", lambda: train.run(ctx, cfg))
    assert str(ctx.project.outputs_path / "shards" / "human") in line and "curriculum.variants" in line


def test_an_unknown_sql_query_is_one_line_naming_it(tmp_path, capsys):
    from annomine import sql_runner

    code = guarded("annomine sql", sql_runner.main, ["--conf", str(LOCAL), "--set", f"project.warehouse={tmp_path}",
                                                     "no_such_query"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no SQL file(s) ['no_such_query']" in err.splitlines()[0] and "available:" in err.splitlines()[0]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_data_file_in_a_table_names_the_table_and_the_file(spark, tables, damage, capsys):
    tables.overwrite("products", spark.createDataFrame(
        [("p1", "Lamp", None, None, None, None, "lamp", "h1", "f.tsv", None)], tables.spec("products").schema))
    part = next(tables.location("products").glob("*.parquet"))
    if damage == "deleted":
        part.unlink()
    else:
        part.write_bytes(part.read_bytes()[:40])
    line = _one_line_error(capsys, "annomine mine", lambda: tables.read("products").collect())
    assert f"table 'products' ({tables.location('products')}): data file {part}" in line


def test_a_truncated_judge_weights_file_is_one_line_naming_it(tmp_path, capsys):
    from annomine.judges.cascade import Tier1
    from annomine.judges.cross_encoder import CrossEncoderModel, build_encoder

    tok, bert = build_encoder("tiny")
    folder = CrossEncoderModel(tok, bert, [1, 2, 3, 4], max_length=32, version="ce-damaged").save(tmp_path / "judge")
    Tier1(folder, [1, 2, 3, 4])  # whole: loads
    weights = next((folder / "encoder").glob("model.*"))
    weights.write_bytes(weights.read_bytes()[:1000])
    line = _one_line_error(capsys, "annomine annotate", lambda: Tier1(folder, [1, 2, 3, 4]))
    assert f"{weights}: the judge's weights cannot be read" in line


def test_llm_serve_on_a_port_in_use_names_the_port(tmp_path, capsys):
    import socket

    from jobs import llm_serve

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = guarded("annomine llm-serve", llm_serve.main, ["--model", str(model), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"port {port} on 127.0.0.1 is not free" in err.splitlines()[0]
