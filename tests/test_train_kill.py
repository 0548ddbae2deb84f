"""Killing `annomine train` (TERM, INT or KILL) ends torchrun and both ranks: none is left to write the
run folder a restart resumes from. Real processes: `python -m jobs.train` -> torchrun -> 2 gloo ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_training import make_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="scans /proc (Linux)")


def _processes(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmd and state != "Z":
            found.append(int(d.name))
    return found


def _wait_for(predicate, timeout: float, what: str, driver: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if driver.poll() is not None and what.startswith("training"):
            pytest.fail(f"`annomine train` exited ({driver.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


@pytest.fixture
def training(tmp_path):
    """`python -m jobs.train` on tiny shards, torchrun x2, with more epochs than it will ever finish."""
    shards = tmp_path / "shards"
    make_shards(shards, n=16, stages=[("hard", "mnr")], variant="curriculum")
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"""project:
  name: kill-test
  warehouse: {tmp_path / 'warehouse'}
  schema: kill_test
  mlflow_experiment: kill-test
train:
  variant: curriculum
  base_model: tiny
  batch_size: 4
  epochs_per_stage: 100000
  launcher: torchrun
  num_proc: 2
  threads: 1
  mlflow: false
  progress: false
  shards_dir: {shards}
""")
    run_dir = tmp_path / "warehouse" / "models" / "curriculum" / "run"
    log = tmp_path / "train.log"
    with open(log, "wb") as fh:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.train", "--conf", str(conf)], cwd=ROOT, stdout=fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    marker = str(run_dir / "spec.json")  # in torchrun's and both ranks' command lines
    try:
        yield driver, run_dir, marker, log
    finally:
        for pid in [driver.pid, *_processes(marker)]:  # never leave a run behind, whatever the outcome
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_killing_the_driver_ends_torchrun_and_every_rank(training, sig):
    driver, run_dir, marker, log = training
    # training is under way: torchrun and both ranks are up and rank 0 has committed an epoch's checkpoint
    _wait_for(lambda: len(_processes(marker)) >= 3 and (run_dir / "progress.json").is_file(), 240,
              "training ranks and progress.json", driver, log)
    os.kill(driver.pid, sig)
    driver.wait(timeout=60)
    assert driver.returncode != 0
    _wait_for(lambda: not _processes(marker), 10, "end of torchrun and its ranks after the driver died", driver, log)
    # and nothing writes the run folder any more
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    time.sleep(2)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before
