"""The shared test base refuses to start on a full disk, with one line saying why."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, free_space_problem


def test_free_space_problem_names_the_folder_and_the_amounts(tmp_path):
    assert free_space_problem(str(tmp_path), needed=0) is None
    problem = free_space_problem(str(tmp_path), needed=10**18)
    assert str(tmp_path) in problem and "GB free" in problem and "needs about 1000000000.0 GB" in problem


def test_a_run_without_room_stops_before_any_test_with_that_line(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_nothing():\n    pass\n")
    env = dict(os.environ, ANNOMINE_TEST_MIN_FREE_GB="1e12", TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                           "-c", str(ROOT / "pytest.ini"), "--confcutdir", str(ROOT / "tests"),
                           "-p", "conftest", str(probe)],
                          cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"GB free in {tmp_path}" in done.stdout + done.stderr
    assert "1 passed" not in done.stdout
