"""A managed llama.cpp server (llama-cpp-python's OpenAI-compatible server) for one local GGUF model.

    with LocalLLMServer(resolve_model("smollm2-135m"), alias="smollm2-135m", n_threads=1) as srv:
        srv.base_url   # 'http://127.0.0.1:PORT/v1'

The server runs as a child process, `python -m annomine.judges.llama_server --model M --model_alias NAME
--host 127.0.0.1 --port P --n_threads N --n_ctx C --logits_all true`: llama-cpp-python's own server (`llama_cpp.server`)
with log-probabilities on, computing logits only where an answer's log-probabilities are read
(annomine/judges/llama_server.py; docs/benchmarks.md has its speed). It serves `/v1/models` and `/v1/chat/completions` with the
model's own chat template and honours `response_format: {type: json_object, schema: ...}` by
compiling the schema into a grammar.

It never outlives the job: it is started through `annomine/lifeline.py` (the same wrapper that ties
torchrun to `annomine train`), in a session of its own, with the kernel asked to SIGKILL it when the
thread that started it exits (Linux `PR_SET_PDEATHSIG`: this covers a SIGKILLed parent too; start it
from a thread that lives as long as the server should, e.g. the main thread); `stop()` (the context
manager's exit, and an `atexit` hook) SIGTERMs the group and SIGKILLs it after `stop_grace_s`.
`start()` picks a free port, waits for `/v1/models` to answer within `startup_timeout_s`, and raises
LocalServerError with the tail of the server's stderr if it exits or never answers.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from annomine.errors import AnnomineError

log = logging.getLogger(__name__)

SERVER_MODULE = "annomine.judges.llama_server"  # llama_cpp.server with logits computed only where they are read
STOCK_SERVER_MODULE = "llama_cpp.server"  # llama-cpp-python's own (every prompt token's logits), for comparisons


class LocalServerError(AnnomineError):
    """The local llama.cpp server could not be started (or is not installed)."""


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise LocalServerError naming `host:port` when something already listens there (or it cannot be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closing socket is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LocalServerError(f"port {port} on {host} is not free ({exc.strerror or exc}): another server "
                                   "listens there; stop it or pick another port (0: a free one)") from None


def _tail(path: Path, lines: int = 15, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])[-limit:]


LOG_DIR_PREFIX = "annomine-llama-"


def remove_stale_log_dirs(root: str | Path | None = None, unowned_after_s: float = 3600.0) -> int:
    """Remove the log folders of servers that are gone (a job killed with SIGKILL cannot clean up after itself;
    its server dies with it, its folder stays). A folder whose server still runs is kept; one without a pid file
    (a server starting right now) only once it is older than `unowned_after_s`. Returns how many were removed."""
    from annomine import lifeline

    removed = 0
    for folder in Path(root or tempfile.gettempdir()).glob(LOG_DIR_PREFIX + "*"):
        try:
            if lifeline.alive(int((folder / "server.pid").read_text())):
                continue
        except (OSError, ValueError):
            try:
                if time.time() - folder.stat().st_mtime < unowned_after_s:
                    continue
            except OSError:
                continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


class LocalLLMServer:
    def __init__(self, model_path: str | Path, alias: str, n_threads: int = 2, n_ctx: int = 2048, host: str = "127.0.0.1",
                 port: int | None = None, startup_timeout_s: float = 180.0, stop_grace_s: float = 10.0,
                 extra_args: list[str] | None = None, server_module: str = SERVER_MODULE):
        self.model_path = Path(model_path)
        self.server_module = server_module
        self.alias = alias
        self.n_threads = int(n_threads)
        self.n_ctx = int(n_ctx)
        self.host = host
        self.port = port
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_grace_s = float(stop_grace_s)
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self._log_dir: Path | None = None

    # ---- properties ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def stderr_path(self) -> Path | None:
        return self._log_dir / "server.log" if self._log_dir else None

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.server_module, "--model", str(self.model_path), "--model_alias", self.alias,
                "--host", self.host, "--port", str(self.port), "--n_threads", str(self.n_threads),
                "--n_threads_batch", str(self.n_threads), "--n_ctx", str(self.n_ctx), "--logits_all", "true",
                *self.extra_args]

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "LocalLLMServer":
        if self.port:
            check_port_free(self.host, self.port)
        if not llama_cpp_available():
            raise LocalServerError("the local LLM server needs llama-cpp-python: pip install 'llama-cpp-python[server]==0.3.36' "
                                   "(or pip install -e '.[llm]')")
        if not self.model_path.is_file():
            raise LocalServerError(f"local LLM server: model file {self.model_path} does not exist")
        from annomine import lifeline

        self.port = self.port or free_port(self.host)
        remove_stale_log_dirs()
        self._log_dir = Path(tempfile.mkdtemp(prefix=LOG_DIR_PREFIX))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stderr_path, "wb") as err:
            # own session: signals to the job's group do not reach it half-way; the lifeline ties it to us, with
            # SIGKILL: uvicorn's graceful shutdown would first finish the generation in flight (minutes on loaded
            # cores), and the server holds nothing worth saving
            self.proc = lifeline.start_tied(self.command(), death_signal="KILL", stdin=subprocess.DEVNULL, stdout=err,
                                            stderr=subprocess.STDOUT, env=env)
        (self._log_dir / "server.pid").write_text(str(self.proc.pid))
        atexit.register(self.stop)
        log.info("local LLM server %s (pid %d) starting on %s", self.alias, self.proc.pid, self.base_url)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()  # the error already carries the tail of its output
            raise
        log.info("local LLM server %s ready on %s", self.alias, self.base_url)
        return self

    def _wait_healthy(self) -> None:
        started = time.monotonic()
        deadline = started + self.startup_timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise LocalServerError(f"local LLM server {self.alias} exited with status {rc} while starting "
                                       f"({self.model_path.name}); its last output:\n{_tail(self.stderr_path)}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                    answered = resp.status == 200 and json.loads(resp.read()).get("data") is not None
            except (urllib.error.URLError, OSError, ValueError):
                answered = False
            if answered:
                self._check_answered_by_ours()
                return
            if time.monotonic() > deadline:
                raise LocalServerError(f"local LLM server {self.alias} did not answer {self.base_url}/models within "
                                       f"{self.startup_timeout_s:g}s; its last output:\n{_tail(self.stderr_path)}")
            time.sleep(0.25)

    def _check_answered_by_ours(self) -> None:
        """After a health check answered: our process must still run (else another server holds the port)."""
        time.sleep(0.2)
        rc = self.proc.poll()
        if rc is not None:
            raise LocalServerError(f"port {self.port} on {self.host} is taken by another server (it answered the health "
                                   f"check; ours exited with status {rc}); stop it or pick another port (0: a free one)")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_report(self) -> str | None:
        """Why requests to a started server fail when its process has died (status or signal, its last output);
        None while it runs."""
        rc = self.proc.poll() if self.proc is not None else None
        if rc is None:
            return None
        import signal

        try:
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
        except ValueError:  # a signal number Python has no name for
            how = f"status {rc}"
        tail = _tail(self.stderr_path, lines=5) if self.stderr_path else ""
        return f"local LLM server {self.alias} exited with {how} after starting; its last output:\n{tail}"

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM the server's group, SIGKILL after `stop_grace_s`; idempotent."""
        proc = self.proc
        if proc is not None:
            from annomine import lifeline

            lifeline.stop_group(proc, self.stop_grace_s)
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass
        if self._log_dir is not None and not keep_log:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> "LocalLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __getstate__(self):  # never pickled with a process handle (pandas-UDF closures)
        state = dict(self.__dict__)
        state["proc"] = None
        return state
