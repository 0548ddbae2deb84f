"""annomine/lifeline.py: the kernel's parent-death signal, and the signal a server asks for."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from annomine import lifeline

# A child that ignores SIGTERM, as a server busy finishing a request in flight does in effect.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def _orphan_after_parent_dies(signal_name: str | None) -> tuple[int, bool]:
    """Start parent -> lifeline -> stubborn child; kill the parent; (child pid, child gone within 10 s)."""
    parent_code = textwrap.dedent(f"""
        import os, subprocess, sys
        env = dict(os.environ)
        if {signal_name!r}:
            env[{lifeline.DEATH_SIGNAL_ENV!r}] = {signal_name!r}
        p = subprocess.Popen([sys.executable, {lifeline.__file__!r}, str(os.getpid()), sys.executable, "-c", {STUBBORN!r}],
                             stdout=subprocess.PIPE, env=env, start_new_session=True, text=True)
        p.stdout.readline()
        print(p.pid, flush=True)
        import time; time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.1)
    gone = not _alive(child)
    if not gone:
        os.kill(child, 9)
    return child, gone


def test_a_child_asking_for_sigkill_dies_with_its_parent_even_when_it_ignores_sigterm():
    _, gone = _orphan_after_parent_dies("KILL")
    assert gone


def test_the_default_death_signal_is_sigterm():
    _, gone = _orphan_after_parent_dies(None)
    assert not gone, "a child that ignores SIGTERM survives the default (SIGTERM) request: the test can tell them apart"
