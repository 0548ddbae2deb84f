"""Publishing a set of files atomically: write a new folder, then switch one pointer.

A writer claims a folder no other run uses (`run_folder(parent, prefix)`: `<parent>/<prefix><tag>`,
the tag being the UTC time and a random suffix), writes every file of the set into it, and publishes
it last by writing a pointer JSON (`write_pointer`: a temporary file renamed over the old pointer).
A reader follows the pointer only (`read_pointer`), so it sees the complete old set or the complete
new one, never a mix; a run killed before its switch leaves the old pointer and an unpublished folder.

While a run writes its folder it holds an exclusive `flock` on `<parent>/.<name>.lock`; a reader that
uses a folder for long (training over shards) holds a shared one (`reading`). `remove_unreferenced`
removes the folders no pointer references and no live process holds: the leftovers of killed runs at
the next start of the stage that owns them, and old published sets after a successful switch.

Paths inside a pointer are stored relative to the pointer's own folder (inside the warehouse), so a
copied warehouse points into itself; `read_pointer` resolves them against the folder it read the pointer
from. An absolute path (a pointer written by an older version) is accepted only while it exists.

Fault injection for tests: every file a publishing step writes is counted (`note_write`); with
`ANNOMINE_TEST_KILL_AT_WRITE=N` the process ends at once (`os._exit`, like kill -9) after its N-th write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from annomine.errors import AnnomineError

log = logging.getLogger(__name__)

KILL_ENV = "ANNOMINE_TEST_KILL_AT_WRITE"
KILLED_EXIT = 137
_writes = 0


class PointerError(AnnomineError):
    """A pointer file that cannot be read or points nowhere (the message names the file)."""


def note_write(path: str | os.PathLike) -> None:
    """Count one file written by a publishing step; ends the process after the N-th when $ANNOMINE_TEST_KILL_AT_WRITE=N."""
    global _writes
    _writes += 1
    kill_at = os.environ.get(KILL_ENV, "").strip()
    if kill_at and _writes == int(kill_at):
        _exit_now(KILLED_EXIT)


def _exit_now(code: int) -> None:
    os._exit(code)


def run_tag() -> str:
    """A name part unique to this run that sorts by start time: `20261206T040500-3fa2b1`."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _lock_file(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def run_folder(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new folder `<parent>/<prefix><tag>`, held by this run (an exclusive lock) for the block."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / f"{prefix}{run_tag()}"
    lock_path = _lock_file(folder)
    with open(lock_path, "a", encoding="utf-8") as lock:  # the lock before the folder: never unclaimed
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.fstat(lock.fileno()).st_ino != os.stat(lock_path).st_ino:  # a pruner removed it before the flock
            raise RuntimeError(f"{lock_path} was removed while it was being taken; run again")
        folder.mkdir()
        yield folder


@contextlib.contextmanager
def reading(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold a published folder for reading (a shared lock): `remove_unreferenced` leaves it alone meanwhile."""
    folder = Path(folder)
    lock_path = _lock_file(folder)
    if not lock_path.is_file():  # a folder of an older layout: nothing prunes it
        yield folder
        return
    with open(lock_path, "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield folder


def _try_exclusive(lock_path: Path):
    """The open lock file, exclusively locked; None when a live process holds it."""
    lock = open(lock_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the caller
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def remove_unreferenced(parent: str | os.PathLike, prefix: str, referenced: Callable[[], Iterable[Path]]) -> list[Path]:
    """Remove the folders `<parent>/<prefix>*` that `referenced()` does not name and no live process holds.

    `referenced` is called after a folder's lock is taken, so a run that published and then let its lock
    go is seen with its new pointer. The removed folders."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for folder in sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)):
        lock_path = _lock_file(folder)
        lock = _try_exclusive(lock_path)
        if lock is None:
            continue
        try:
            keep = {Path(p).resolve() for p in referenced()}
            if folder.resolve() in keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(folder)
        finally:
            lock.close()
    for lock_path in parent.glob(f".{prefix}*.lock"):  # a folder's lock left after its folder moved away
        if not (parent / lock_path.name[1:-len(".lock")]).exists():
            lock = _try_exclusive(lock_path)
            if lock is not None:
                lock_path.unlink(missing_ok=True)
                lock.close()
    if removed:
        log.info("removed %d unpublished or superseded folder(s) under %s: %s", len(removed), parent,
                 ", ".join(p.name for p in removed))
    return removed


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a file next to `path`, then rename it over `path`: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    note_write(path)
    return path


def write_pointer(file: str | os.PathLike, data: dict, path_keys: tuple[str, ...] = ("path",)) -> Path:
    """Write a pointer JSON atomically, the values of `path_keys` stored relative to the pointer's folder."""
    file = Path(file)
    stored = dict(data)
    for key in path_keys:
        if stored.get(key):
            stored[key] = os.path.relpath(Path(stored[key]).resolve(), file.parent.resolve())
    text = json.dumps(stored, indent=2, sort_keys=True, default=str)
    return write_atomically(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_pointer(file: str | os.PathLike, path_keys: tuple[str, ...] = ("path",), rerun: str = "") -> dict:
    """A pointer JSON with the values of `path_keys` resolved to absolute paths (as strings).

    A pointer that is not a JSON object, or an absolute path that does not exist, is a `PointerError`
    naming the file (`rerun`: the command that writes the pointer again, for the message)."""
    file = Path(file)
    hint = f"; {rerun}" if rerun else ""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PointerError(f"{file}: not a readable pointer ({type(exc).__name__}: {exc}){hint}") from exc
    if not isinstance(data, dict):
        raise PointerError(f"{file}: not a pointer (a JSON {type(data).__name__}, expected an object){hint}")
    for key in path_keys:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise PointerError(f"{file}: '{key}' is {value!r}, expected a path{hint}")
        path = Path(value)
        if path.is_absolute():
            if not path.exists():
                raise PointerError(f"{file}: '{key}' is the absolute path {value}, which does not exist (a pointer from "
                                   f"another warehouse or an older version){hint}")
        else:
            path = file.parent / path
        data[key] = str(path.resolve())
    return data
