"""A Spark standalone cluster on this machine, for tests: one master and N workers on 127.0.0.1.

pyspark's own package is a Spark distribution: `spark-class org.apache.spark.deploy.master.Master` and
`... deploy.worker.Worker spark://127.0.0.1:<port>` start a standalone cluster with nothing else installed
(Java 17). `StandaloneCluster.start(workers=2, cores=1)` picks free ports, gives every daemon its own
work, log and local folders under one temporary folder, starts them and returns once the master's JSON
status (`http://127.0.0.1:<webui port>/json`) lists every worker ALIVE. With one core per worker, an
application gets one executor per worker: separate JVMs with their own Python workers.

Every daemon starts in a process group of its own (`start_new_session`); the executors a worker starts
and their Python workers stay in that group. `stop()` sends SIGTERM to each group (the daemons' shutdown
hooks stop their executors), then SIGKILL to what is left, and removes the folder. It runs from a
`finally`, at interpreter exit (atexit), on SIGTERM or SIGINT to this process, and, when this process is
killed outright (SIGKILL), every daemon gets SIGTERM from the kernel (Linux `PR_SET_PDEATHSIG`); an
executor whose worker is gone exits on its own (Spark's WorkerWatcher).

    python -m tests.cluster [--workers 2] [--cores 1]   # prints the master URL; Ctrl-C stops everything
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
_PR_SET_PDEATHSIG = 1
_LIVE: list["StandaloneCluster"] = []
_LIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


def spark_home() -> Path:
    """The Spark distribution inside the installed pyspark package (or $SPARK_HOME)."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import pyspark

    return Path(pyspark.__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Run as `python -c _DIE_WITH_PARENT <parent pid> <command...>`: asks the kernel for SIGTERM when the parent
# dies (even by SIGKILL), then execs the command (the request survives exec). A wrapper process, not a
# `preexec_fn`: that would make subprocess fork() the whole test process and run the fork handlers of
# gRPC (Spark Connect's client), which abort the child.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    f"    ctypes.CDLL('libc.so.6', use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies left out), read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@dataclass
class StandaloneCluster:
    root: Path
    master_port: int
    webui_port: int
    workers: int
    cores: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    keep_root: bool = False

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def groups(self) -> list[int]:
        """The process group of every daemon started (= its pid): where its executors live too."""
        return [p.pid for p in self.procs]

    @classmethod
    def start(cls, workers: int = 2, cores: int = 1, memory: str = "1g", timeout_s: float = 180.0,
              root: str | None = None) -> "StandaloneCluster":
        cluster = cls(Path(root or tempfile.mkdtemp(prefix="annomine-cluster-")), free_port(), free_port(), workers, cores)
        _register(cluster)
        try:
            cluster._spawn("master", MASTER_CLASS, "--host", "127.0.0.1", "--port", str(cluster.master_port),
                           "--webui-port", str(cluster.webui_port))
            cluster._wait(lambda s: True, timeout_s, "the master to answer")
            for i in range(workers):
                work = cluster.root / f"worker{i}" / "work"
                work.mkdir(parents=True)
                cluster._spawn(f"worker{i}", WORKER_CLASS, cluster.master_url, "--host", "127.0.0.1", "--cores", str(cores),
                               "--memory", memory, "--work-dir", str(work), "--webui-port", str(free_port()))
            cluster._wait(lambda s: s.get("aliveworkers", 0) >= workers, timeout_s, f"{workers} workers to register")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _env(self, name: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_GATEWAY", "SPARK_CONNECT_MODE"))}
        local = self.root / name / "local"
        local.mkdir(parents=True, exist_ok=True)
        env.update(SPARK_HOME=str(spark_home()), SPARK_LOG_DIR=str(self.root / name / "logs"), SPARK_LOCAL_DIRS=str(local),
                   SPARK_PID_DIR=str(self.root / name), SPARK_LOCAL_IP="127.0.0.1",
                   SPARK_DAEMON_MEMORY=os.environ.get("ANNOMINE_CLUSTER_DAEMON_MEMORY", "256m"))
        return env

    def _spawn(self, name: str, main_class: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed once the process is started
        try:
            cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), str(spark_home() / "bin" / "spark-class"),
                   main_class, *args]
            proc = subprocess.Popen(cmd, env=self._env(name), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            log.close()
        self.procs.append(proc)

    def status(self) -> dict:
        """The master's JSON status (workers, their cores, running applications)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json", timeout=5) as resp:
            return json.loads(resp.read())

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Spark daemon exited (status {dead[0].returncode}) while waiting for {what}; "
                                   f"see {self.root}/*.log:\n{self.logs_tail()}")
            try:
                if ready(self.status()):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout_s:.0f} s for {what}; see {self.root}/*.log:\n{self.logs_tail()}")

    def logs_tail(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.root.glob("*.log")))

    def leftover(self) -> list[int]:
        """Processes still alive in the daemons' process groups (empty once `stop` is done)."""
        return [pid for g in self.groups for pid in group_members(g)]

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every daemon's group, SIGKILL what is left after `grace_s`, remove the folder. Idempotent."""
        for g in self.groups:
            _signal_group(g, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.leftover() and time.monotonic() < deadline:
            time.sleep(0.2)
        for g in self.groups:
            _signal_group(g, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _unregister(self)
        if not self.keep_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "StandaloneCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for cluster in live:
        cluster.stop(grace_s=10.0)


def _on_signal(signum, frame) -> None:
    stop_all()
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_PREVIOUS: dict[int, object] = {}


def _register(cluster: StandaloneCluster) -> None:
    global _HANDLERS_INSTALLED
    with _LIVE_LOCK:
        _LIVE.append(cluster)
        if _HANDLERS_INSTALLED:
            return
        _HANDLERS_INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            _PREVIOUS[sig] = signal.signal(sig, _on_signal)


def _unregister(cluster: StandaloneCluster) -> None:
    with _LIVE_LOCK:
        if cluster in _LIVE:
            _LIVE.remove(cluster)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--memory", default="1g")
    args = parser.parse_args(argv)
    cluster = StandaloneCluster.start(args.workers, args.cores, args.memory)
    print(json.dumps({"master": cluster.master_url, "webui": f"http://127.0.0.1:{cluster.webui_port}",
                      "groups": cluster.groups, "root": str(cluster.root)}), flush=True)
    try:
        signal.pause() if hasattr(signal, "pause") else time.sleep(1e9)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
