"""Configuration and input mistakes: one clear line naming the file and key, exit status 2, no traceback."""

from __future__ import annotations

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
