"""Damaged Delta table folders: a data file the table's log lists that is gone, or shorter than the log says.

An engine that meets such a file fails with a long error that names neither the table nor what to do;
`delta_file_problem` finds the file from the log itself (delta-rs reads the log, not the data), so the
CLI can say which table and which file in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote


def _active_files(location: Path) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every data file the table's current version reads."""
    import pyarrow as pa
    from deltalake import DeltaTable

    actions = pa.table(DeltaTable(str(location)).get_add_actions(flatten=True)).select(["path", "size_bytes"]).to_pydict()
    return list(zip(actions["path"], actions["size_bytes"]))


def delta_file_problem(location: str | os.PathLike) -> str | None:
    """'data file X is missing' / 'data file X is truncated (n of m bytes)' for the first damaged data file of the
    Delta table at `location`; None when every file is whole or the log itself cannot be read."""
    location = Path(location)
    try:
        files = _active_files(location)
    except Exception:  # noqa: BLE001 - an unreadable log is not what this looks for
        return None
    for relative, size in files:
        path = location / relative
        if not path.is_file() and (location / unquote(relative)).is_file():  # a log path still URL-encoded
            path = location / unquote(relative)
        if not path.is_file():
            return f"data file {path} is missing"
        actual = path.stat().st_size
        if size is not None and actual != int(size):
            return f"data file {path} is damaged ({actual} bytes, the table's log says {int(size)})"
    return None
