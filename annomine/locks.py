"""One run of a job per warehouse at a time: `with warehouse_lock(project, "annotate", wait_s=0):`.

The lock is `fcntl.flock` on `<warehouse>/locks/<name>.lock`, kept open while the block runs: the
operating system drops it when the holder exits, crashes or is killed, so no stale lock is ever
left behind. The file records the holder (pid, host, start time) for the message of a run that
finds it taken; that run waits up to `wait_s` seconds, then raises `LockHeld` naming the holder.

Scope: the lock excludes processes that see the same warehouse folder on one machine (flock over
NFS is not reliable). With `project.catalog` set the tables live in a catalog that other machines
reach too, and this lock still only excludes runs on this machine: on Databricks, let the
workflow run one instance at a time (`max_concurrent_runs: 1`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from annomine.config import ProjectConfig
from annomine.errors import AnnomineError

log = logging.getLogger(__name__)


class LockHeld(AnnomineError):
    """Another run holds the lock (the message names it)."""


def lock_path(project: ProjectConfig, name: str) -> Path:
    return project.warehouse_path / "locks" / f"{name}.lock"


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "another process (holder not recorded yet)"
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('started_at')}"


@contextlib.contextmanager
def warehouse_lock(project: ProjectConfig, name: str, wait_s: float = 0.0, poll_s: float = 0.5) -> Iterator[dict]:
    """Hold the `name` lock of the project's warehouse for the block; yields the holder record."""
    path = lock_path(project, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if project.catalog:
        log.info("lock %s is local to this machine; tables are in catalog %s", path, project.catalog)
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        waited = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockHeld(f"{name} is already running on warehouse {project.warehouse_path}: held by "
                                   f"{_holder(path)} (lock file {path}); wait for it to finish"
                                   f"{f' (waited {wait_s:g}s)' if wait_s else ''}") from None
                if not waited:
                    log.info("%s: waiting up to %gs for %s", name, wait_s, _holder(path))
                    waited = True
                time.sleep(min(poll_s, left))
        holder = {"name": name, "pid": os.getpid(), "host": socket.gethostname(),
                  "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(holder))
        fh.flush()
        yield holder
    finally:
        fh.close()  # releases the flock
