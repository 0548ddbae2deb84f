"""Shared test base: one embedded Spark session for the whole run, a fresh warehouse per test.

Like delta-io's shared Spark test base: starting an engine is the slow part, so it happens once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from annomine.config import ProjectConfig  # noqa: E402
from annomine.runtime import JobContext  # noqa: E402
from annomine.spark import get_spark, stop_embedded  # noqa: E402
from annomine.tables import TableStore  # noqa: E402

# One run writes about 0.6 GB under the temporary folder (warehouses, checkpoints, MLflow stores); with less
# free than this, tests would fail one by one on ENOSPC in their setup instead of saying why once.
MIN_FREE_BYTES = int(float(os.environ.get("ANNOMINE_TEST_MIN_FREE_GB", "1.5")) * 1e9)


def free_space_problem(folder: str, needed: int = MIN_FREE_BYTES) -> str | None:
    """One line saying the test run cannot fit in `folder`, or None when it can."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free >= needed:
        return None
    return (f"only {free / 1e9:.1f} GB free in {folder}; the test run needs about {needed / 1e9:.1f} GB "
            "(free some space, or point TMPDIR at a larger disk)")


def pytest_sessionstart(session):
    import tempfile

    problem = free_space_problem(tempfile.gettempdir())
    if problem:
        pytest.exit(problem, returncode=1)


@pytest.fixture(scope="session")
def spark():
    session = get_spark(ProjectConfig())
    yield session
    stop_embedded()


@pytest.fixture
def project(tmp_path) -> ProjectConfig:
    return ProjectConfig(name="test", warehouse=str(tmp_path / "warehouse"), schema=f"t_{tmp_path.name.replace('-', '_')}",
                         mlflow_experiment="annomine-test")


@pytest.fixture
def tables(spark, project) -> TableStore:
    return TableStore(spark, project)


@pytest.fixture
def ctx(spark, project, tables) -> JobContext:
    return JobContext(project, spark, tables)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    """Write a small TSV file the way users' exports look (quoted where needed)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


def run_concurrently(work, n: int) -> None:
    """Run `work(i)` for i in 0..n-1, each in its own thread, and wait for all of them."""
    import threading

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def printed_summary(capsys, warehouse: Path, name: str) -> dict:
    """What a judge / annotate command wrote to `<warehouse>/runs/<name>_summary.json`, after checking that the
    terminal got a few lines for a person naming that file rather than the summary itself."""
    import json

    out = capsys.readouterr().out
    path = Path(warehouse).resolve() / "runs" / f"{name}_summary.json"
    assert str(path) in out and len(out.splitlines()) <= 4 and not out.lstrip().startswith("{"), out
    return json.loads(path.read_text())
