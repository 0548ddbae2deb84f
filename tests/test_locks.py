"""annomine/locks.py: one holder per warehouse and name, across real processes; a killed holder frees it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from annomine.config import ProjectConfig
from annomine.errors import AnnomineError
from annomine.locks import LockHeld, lock_path, warehouse_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = (
    "import sys, time\n"
    "from annomine.config import ProjectConfig\n"
    "from annomine.locks import warehouse_lock\n"
    "with warehouse_lock(ProjectConfig(warehouse=sys.argv[1]), 'annotate'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
)


@pytest.fixture
def project(tmp_path) -> ProjectConfig:
    return ProjectConfig(warehouse=str(tmp_path / "wh"))


def hold(project: ProjectConfig, seconds: float) -> subprocess.Popen:
    """Another process holding the 'annotate' lock for `seconds`; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, project.warehouse, str(seconds)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(project):
    proc = hold(project, 60)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeld, match=f"annotate is already running on warehouse .*held by pid {proc.pid} on "
                                           f"{socket.gethostname()} since ") as refused:
            with warehouse_lock(project, "annotate"):
                pytest.fail("entered a lock another process holds")
        assert time.monotonic() - started < 1.0 and isinstance(refused.value, AnnomineError)
        with warehouse_lock(project, "train") as me:   # another name is another lock
            assert me["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_waits_for_the_holder_up_to_wait_s(project):
    proc = hold(project, 1.5)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeld, match=r"\(waited 0.3s\)"):
            with warehouse_lock(project, "annotate", wait_s=0.3, poll_s=0.05):
                pass
        assert time.monotonic() - started >= 0.3
        with warehouse_lock(project, "annotate", wait_s=30, poll_s=0.05) as me:
            assert time.monotonic() - started >= 1.2   # only once the holder was done (it held 1.5 s)
            assert json.loads(lock_path(project, "annotate").read_text())["pid"] == me["pid"] == os.getpid()
    finally:
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(project):
    proc = hold(project, 600)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(lock_path(project, "annotate").read_text())["pid"] == proc.pid   # its record is still there
    with warehouse_lock(project, "annotate") as me:                                     # but not its lock
        assert me["pid"] == os.getpid()


def test_the_lock_is_not_reentrant_within_a_process(project):
    with warehouse_lock(project, "annotate"):
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            with warehouse_lock(project, "annotate"):
                pass
    with warehouse_lock(project, "annotate"):   # released on exit
        pass
