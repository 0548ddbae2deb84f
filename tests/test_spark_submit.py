"""The spark-submit path: `spark-submit --remote sc://... jobs/ingest.py --conf ...` against a Sail
Spark Connect server, with real Delta tables (docs/spark_submit.md).

Without a local spark-submit (or Java) the same entry point runs in-process. The classic path
(`spark-submit --master local[1]`, a JVM driver) takes over a minute to start here and cannot
write Delta without the delta-spark jars, so only its session and UDF wiring is checked, and
only when ANNOMINE_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import deltalake
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = shutil.which("spark-submit") or str(Path(sys.executable).with_name("spark-submit"))
HAVE_SPARK_SUBMIT = Path(SPARK_SUBMIT).is_file() and shutil.which("java") is not None


def _connect_url() -> tuple[str, object | None]:
    """The embedded Sail server of this test session (or a new one)."""
    from annomine import spark as spark_mod

    server = spark_mod._embedded_server
    owned = None
    if server is None:
        from pysail.spark import SparkConnectServer

        server = owned = SparkConnectServer(ip="127.0.0.1", port=0)
        server.start(background=True)
    _, port = server.listening_address
    return f"sc://127.0.0.1:{port}", owned


def _driver_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYSPARK_", "SPARK_")) and k != "ANNOMINE_SPARK_MODE"}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def test_ingest_stage_through_spark_submit_on_spark_connect(spark, tmp_path):
    schema = f"submit_{uuid.uuid4().hex[:8]}"
    shop = tmp_path / "shop"
    conf = tmp_path / "submit.yaml"
    conf.write_text(
        f"project: {{name: submit-test, warehouse: '{tmp_path / 'wh'}', schema: {schema}}}\n"
        "ingest:\n"
        f"  demo_shop: {{folder: '{shop}', n_products: 40, n_queries: 10, n_labelled: 3, seed: 7}}\n"
        f"  products: {{path: '{shop / 'products.tsv'}'}}\n"
        f"  queries: {{path: '{shop / 'queries.tsv'}'}}\n"
        f"  labels: {{path: '{shop / 'labels.tsv'}'}}\n"
        "  queries_origin: log\n")
    if HAVE_SPARK_SUBMIT:
        url, owned = _connect_url()
        try:
            cmd = [SPARK_SUBMIT, "--remote", url, "jobs/ingest.py", "--conf", str(conf)]
            proc = subprocess.run(cmd, cwd=ROOT, env=_driver_env(), capture_output=True, text=True, timeout=240)
        finally:
            if owned is not None:
                owned.stop()
        out = proc.stdout
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:  # the same entry point, in this process
        import contextlib
        import io

        from jobs.ingest import main

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["--conf", str(conf)]) == 0
        out = buffer.getvalue()
    # The demo shop's 40 products + 4 deliberately bad rows: 39 load, 5 are quarantined.
    assert re.search(r"^products: 44 rows read, 39 loaded, 5 quarantined", out, re.M), out
    assert "queries: 10 rows read, 10 loaded, 0 quarantined" in out
    warehouse = tmp_path / "wh" / schema
    assert deltalake.DeltaTable(str(warehouse / "products")).to_pyarrow_table().num_rows == 39
    assert deltalake.DeltaTable(str(warehouse / "quarantine")).to_pyarrow_table().num_rows == 5
    texts = deltalake.DeltaTable(str(warehouse / "products")).to_pyarrow_table().column("text").to_pylist()
    assert all(t and t.strip() for t in texts)  # written by the pandas UDF: Connect UDFs under spark-submit


def _mode(env_extra: dict) -> bool:
    """Whether importing annomine selects Spark Connect UDFs in a process with this environment."""
    env = _driver_env() | env_extra
    code = "import os, annomine; print('SPARK_CONNECT_MODE_ENABLED' in os.environ)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip() == "True"


def test_connect_or_classic_is_decided_from_the_driver_environment():
    assert _mode({}) is True                                                   # plain python: Connect
    assert _mode({"PYSPARK_GATEWAY_PORT": "1234"}) is False                    # spark-submit: classic
    assert _mode({"DATABRICKS_RUNTIME_VERSION": "17.3"}) is False              # Databricks cluster
    remote = {"PYSPARK_GATEWAY_PORT": "1234", "PYSPARK_REMOTE_INIT_CONF_LEN": "1",
              "PYSPARK_REMOTE_INIT_CONF_0": json.dumps({"spark.remote": "sc://h:15002", "spark.app.name": "x"})}
    assert _mode(remote) is True                                               # spark-submit --remote
    assert _mode({"PYSPARK_GATEWAY_PORT": "1234", "SPARK_REMOTE": "sc://h:15002"}) is True


def test_submit_remote_url_is_read_from_spark_submit(monkeypatch):
    from annomine.spark import _submit_remote

    monkeypatch.setenv("PYSPARK_REMOTE_INIT_CONF_LEN", "1")
    monkeypatch.setenv("PYSPARK_REMOTE_INIT_CONF_0", json.dumps({"spark.remote": "sc://h:15002"}))
    assert _submit_remote() == "sc://h:15002"
    monkeypatch.setenv("PYSPARK_REMOTE_INIT_CONF_0", json.dumps({"spark.app.name": "x"}))
    assert _submit_remote() is None


def test_docs_give_the_delta_coordinates_of_the_supported_spark():
    import pyspark

    doc = (ROOT / "docs" / "spark_submit.md").read_text()
    major_minor = ".".join(pyspark.__version__.split(".")[:2])
    assert re.search(rf"io\.delta:delta-spark_{re.escape(major_minor)}_2\.13:\d+\.\d+\.\d+", doc), \
        f"docs/spark_submit.md lacks the delta-spark coordinates for Spark {major_minor}"
    assert "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension" in doc
    assert "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog" in doc
    for stage in ("ingest", "channels", "mine", "judge", "annotate", "curriculum", "train", "evaluate"):
        assert f"jobs/{stage}.py" in doc


@pytest.mark.skipif(os.environ.get("ANNOMINE_SLOW_TESTS") != "1" or not HAVE_SPARK_SUBMIT,
                    reason="classic spark-submit takes over a minute to start; set ANNOMINE_SLOW_TESTS=1")
def test_classic_spark_submit_uses_the_cluster_session(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\n"
        "from annomine.config import ProjectConfig\n"
        "from annomine.spark import get_spark, is_embedded\n"
        "from annomine import ingestion\n"
        "s = get_spark(ProjectConfig())\n"
        "df = s.createDataFrame([('a', 'Lamp', '', '', '', '')], 'product_id string, title string, description string, "
        "brand string, category string, attributes string')\n"
        "good, bad = ingestion.validate_products(df, 'probe')\n"
        "print('RESULT', type(s).__module__, is_embedded(), good.count(), good.first().text)\n")
    proc = subprocess.run([SPARK_SUBMIT, "--master", "local[1]", str(probe)], cwd=ROOT, env=_driver_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT pyspark.sql.session False 1 Lamp" in proc.stdout
