"""The session factory replaces a session the embedded engine has ended (idle timeout)."""

import subprocess
import sys
import textwrap


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
