"""The session factory replaces a session the embedded engine has ended (idle timeout)."""

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import write_tsv

ROOT = Path(__file__).resolve().parents[1]


def test_an_ended_session_is_replaced():
    script = textwrap.dedent("""
        from annomine.spark import get_spark, stop_embedded
        first = get_spark()
        assert first.sql("SELECT 1 AS x").collect()[0]["x"] == 1
        first.stop()  # what the engine does to a session left idle too long
        second = get_spark()
        assert second is not first
        assert second.sql("SELECT 2 AS x").collect()[0]["x"] == 2
        assert get_spark() is second  # a live session is reused
        stop_embedded()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def _run(script: str, env_extra: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "SAIL_SPARK__SESSION_TIMEOUT_SECS"} | env_extra
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def test_the_embedded_server_keeps_idle_sessions_for_a_day_unless_the_user_says_otherwise():
    out = _run("""
        import os
        from annomine.spark import get_spark, stop_embedded
        get_spark().sql("SELECT 1").collect()
        print("timeout", os.environ["SAIL_SPARK__SESSION_TIMEOUT_SECS"])
        stop_embedded()
    """, {})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "timeout 86400" in out.stdout


def test_a_session_the_engine_expires_mid_pipeline_is_replaced_and_the_pipeline_completes(tmp_path):
    """The engine drops a session idle for 2 s; ingest then idles 4 s (as the judge stage does while it
    trains); channels and mine must still run on a new session, and their tables must be complete."""
    products = write_tsv(tmp_path / "in" / "products.tsv", ["product_id", "title", "description"],
                         [[f"p{c}{o}", f"{c} {o}", ""] for c in ("red", "blue", "green") for o in ("pillow", "mug", "lamp")])
    queries = write_tsv(tmp_path / "in" / "queries.tsv", ["query_id", "query"],
                        [["q1", "red pillow"], ["q2", "blue mug"], ["q3", "lamp"]])
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"project: {{warehouse: '{tmp_path / 'wh'}', schema: expire}}\n"
        f"ingest: {{products: {{path: '{products}'}}, queries: {{path: '{queries}'}}, queries_origin: log}}\n"
        "channels: {channels: [lexical, bm25], top_k: 5, n_built_queries: 0, mlflow: false}\n"
        "mine: {max_rank: 5, easy_top_k: 2, hard_positive_top_k: 5, hard_negative_top_k: 5, "
        "hard_positive_channels: [lexical], hard_positive_missed_by: [bm25]}\n"
    )
    out = _run(f"""
        import time
        import jobs.ingest
        from jobs import pipeline
        real_run = jobs.ingest.run

        def slow_ingest(ctx, cfg):
            result = real_run(ctx, cfg)
            time.sleep(4)  # no Spark request: the engine ends the idle session meanwhile
            return result

        jobs.ingest.run = slow_ingest
        pipeline.run_pipeline({str(conf)!r}, [], only=["ingest", "channels", "mine"])
        from annomine.config import load_project_config
        from annomine.runtime import open_context
        ctx = open_context(load_project_config({str(conf)!r}))
        print("mined", ctx.tables.read("mined_candidates").count())
    """, {"SAIL_SPARK__SESSION_TIMEOUT_SECS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "session ended" in out.stderr  # it did expire, and was replaced
    assert "mine: done" in out.stdout
    assert int(out.stdout.split("mined")[-1].split()[0]) > 0
