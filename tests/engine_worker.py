"""A second engine for tests: classic local JVM Spark, in its own Python process.

PySpark decides per call whether a function, a Column or a UDF is classic or Spark Connect, from the
process environment (`SPARK_CONNECT_MODE_ENABLED`, set by `annomine/__init__.py` unless the process is
classic), so one process cannot drive Sail (Connect) and a JVM session (classic) at once. The test
process keeps Sail; `JvmEngine.start()` starts `python -m tests.engine_worker` with
ANNOMINE_SPARK_MODE=classic and PYSPARK_PYTHON set to this interpreter, which opens one
`project.engine: local_jvm` session (Parquet tables) and then runs, one request at a time, a named
function `fn(ctx, **kwargs)` with a JobContext on that session. Requests and replies are JSON lines on
the worker's stdin and on a private copy of its stdout; everything the job code, Spark or the JVM
print goes to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what would make the worker a Spark Connect (or spark-submit) process
_CONNECT_ENV = ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE", "PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET",
                "PYSPARK_REMOTE_INIT_CONF_LEN")


class EngineError(RuntimeError):
    """A call failed in the worker (its traceback is the message) or the worker stopped answering."""


class JvmEngine:
    """Client of one worker process: `call("module:function", project={...}, **kwargs)`, then `stop()`."""

    def __init__(self, proc: subprocess.Popen, version: str):
        self.proc, self.version = proc, version

    @classmethod
    def start(cls, timeout_s: float = 600.0, nice: int = 0) -> JvmEngine:
        env = {k: v for k, v in os.environ.items() if k not in _CONNECT_ENV}
        env.update(ANNOMINE_SPARK_MODE="classic", PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
                   PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        cmd = [sys.executable, "-m", "tests.engine_worker"]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        engine = cls(proc, "")
        engine.version = engine._reply(timeout_s)["ready"]
        return engine

    def _reply(self, timeout_s: float) -> dict:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise EngineError(f"the JVM engine worker did not answer within {timeout_s:.0f} s")
            if sel.select(timeout=min(left, 5.0)):
                line = self.proc.stdout.readline()
                if not line:
                    raise EngineError(f"the JVM engine worker exited (status {self.proc.wait()}); see its stderr")
                reply = json.loads(line)
                if "error" in reply:
                    raise EngineError(reply["error"])
                return reply

    def call(self, fn: str, project: dict, timeout_s: float = 900.0, **kwargs):
        """Run `fn(ctx, **kwargs)` in the worker on a JobContext for ProjectConfig(**project) (engine
        local_jvm, table_format parquet); return its JSON-able result."""
        self.proc.stdin.write(json.dumps({"fn": fn, "project": project, "kwargs": kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout_s)["result"]

    def stop(self, timeout_s: float = 120.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _serve() -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # job output, Spark's and the JVM's: stderr (the JVM inherits fd 1 too)
    sys.stdout = sys.stderr

    def answer(**reply) -> None:
        replies.write(json.dumps(reply, default=str) + "\n")

    try:
        from annomine.config import ProjectConfig
        from annomine.runtime import JobContext
        from annomine.spark import get_spark, stop_embedded
        from annomine.tables import TableStore

        base = {"engine": "local_jvm", "table_format": "parquet"}
        spark = get_spark(ProjectConfig(**base))
        answer(ready=spark.version)
    except Exception:  # noqa: BLE001 - reported to the caller, then exit
        answer(error=traceback.format_exc())
        return 1
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("stop"):
                break
            try:
                project = ProjectConfig(**{**request["project"], **base})
                project.validate()
                tables = TableStore(spark, project)
                tables.register_all()
                module, name = request["fn"].split(":")
                fn = getattr(importlib.import_module(module), name)
                answer(result=fn(JobContext(project, spark, tables), **request["kwargs"]))
            except Exception:  # noqa: BLE001 - the caller's test fails with this traceback
                answer(error=traceback.format_exc())
    finally:
        stop_embedded()
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
