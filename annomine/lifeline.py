"""Tie the training processes to the driver that launched them: no rank outlives `annomine train`.

Driver side, `run_tied(cmd)`: the launcher (torchrun) runs in a session and process group of its own,
through `python annomine/lifeline.py PID CMD`, which asks the kernel for SIGTERM when the driver dies
(Linux `PR_SET_PDEATHSIG`, kept across exec; so this holds for a SIGKILLed driver too; torchrun
answers SIGTERM by stopping its workers) and then execs CMD, and
SIGTERM, SIGINT and SIGHUP sent to the driver are forwarded to that group. The driver then waits for
the group (SIGKILL after `grace` seconds) and only then acts on the signal itself: SIGINT raises
KeyboardInterrupt, SIGTERM/SIGHUP exit with status 128 + signal (a handler installed before runs instead).
Signals the driver ignores (nohup) are not forwarded.

Rank side, `die_with_parent()`, first thing in a worker torchrun started: torchrun puts every worker
in a session of its own, so no signal to the driver's or torchrun's group reaches it. The worker asks
for SIGKILL when its parent (torchrun's agent) exits and, as a portable fallback that also covers the
moments before that request, a daemon thread checks every second that its parent and the driver
(`ANNOMINE_DRIVER_PID`, set by the launcher) are alive.

`PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not its process: `run_tied`
blocks in the calling thread until the child ends, and torchrun's agent starts workers from its main
thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
DRIVER_PID_ENV = "ANNOMINE_DRIVER_PID"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(sig: int) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent thread exits."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _install(handler) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers belong to the main thread; death of the driver is still covered
    previous = {}
    for sig in FORWARDED:
        current = signal.getsignal(sig)
        if current is not signal.SIG_IGN and current is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def _wait(proc: subprocess.Popen, received: list, grace: float) -> int:
    deadline = None
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if received and deadline is None:
            deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            _signal_group(proc.pid, signal.SIGKILL)
            return proc.wait()


def start_tied(cmd: list[str], *, death_signal: str = "TERM", **popen_kw) -> subprocess.Popen:
    """Start `cmd` in a session and process group of its own, through this module, so that the kernel sends it
    `death_signal` (TERM or KILL) when the calling thread exits; the Popen of the group leader."""
    # no preexec_fn: forking a driver that runs gRPC threads (Spark Connect) can abort the child
    wrapped = [sys.executable, os.path.abspath(__file__), str(os.getpid()), *cmd]  # stdlib only: any env
    if death_signal != "TERM":
        popen_kw["env"] = {**(popen_kw.get("env") or os.environ), DEATH_SIGNAL_ENV: death_signal}
    return subprocess.Popen(wrapped, start_new_session=True, **popen_kw)


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the group `proc` leads, SIGKILL it after `grace` seconds; returns once the leader is reaped."""
    if proc.poll() is not None:
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            pass


def run_tied(cmd: list[str], *, grace: float = 30.0, **popen_kw) -> int:
    """Run `cmd` to its end in a process group tied to this process (see the module doc); its exit status."""
    received: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        received.append(signum)
        if proc is not None:
            _signal_group(proc.pid, signum)

    previous = _install(forward)
    try:
        proc = start_tied(cmd, **popen_kw)
        if received:  # arrived while the child was being started
            _signal_group(proc.pid, received[0])
        rc = _wait(proc, received, grace)
    finally:
        if proc is not None and proc.poll() is None:  # an exception here: the group goes down with it
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        signum = received[0]
        if previous.get(signum) is signal.SIG_DFL:
            raise SystemExit(128 + signum)
        signal.raise_signal(signum)  # the handler that was there before (SIGINT: KeyboardInterrupt)
    return rc


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead process nobody has reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead driver nobody has reaped yet is a zombie, not alive
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def die_with_parent(poll: float = 1.0) -> None:
    """In a worker started by torchrun: SIGKILL this process when its parent or the driver exits."""
    set_parent_death_signal(signal.SIGKILL)
    parent = os.getppid()
    driver = int(os.environ.get(DRIVER_PID_ENV) or 0)

    def orphaned() -> bool:
        return os.getppid() != parent or (driver > 0 and not alive(driver))

    def watch() -> None:
        while not orphaned():
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGKILL)

    if orphaned():
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="annomine-lifeline", daemon=True).start()


DEATH_SIGNAL_ENV = "ANNOMINE_LIFELINE_SIGNAL"


def main(argv: list[str]) -> None:
    """`python annomine/lifeline.py DRIVER_PID CMD...`: exec CMD, to get SIGTERM when the driver dies
    (or the signal named in ANNOMINE_LIFELINE_SIGNAL, e.g. KILL for a server whose graceful shutdown would
    wait for a request in flight).

    The parent-death request survives exec; it is made here rather than in a preexec_fn."""
    driver, cmd = int(argv[0]), argv[1:]
    name = os.environ.pop(DEATH_SIGNAL_ENV, "TERM").upper().removeprefix("SIG")
    set_parent_death_signal(getattr(signal, f"SIG{name}", signal.SIGTERM))
    if os.getppid() != driver:  # the driver died before the request took effect
        sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
