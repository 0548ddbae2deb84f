"""User-facing errors: a bad config, a bad input file, an endpoint that refuses the key.

The CLI prints any `AnnomineError` as one line (`annomine <stage>: <message>`) and exits 2; a
traceback follows only with `--debug` (or ANNOMINE_DEBUG=1). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class AnnomineError(Exception):
    """A user-facing error: the CLI prints it as one line and exits 2."""


class MissingInputError(AnnomineError, FileNotFoundError):
    """Something a stage reads is absent: a file, a table an earlier stage writes, a trained model."""


class DamagedInputError(AnnomineError):
    """Something a stage reads is there but unreadable: a truncated file, a table missing one of its data files."""


class EndpointError(AnnomineError, RuntimeError):
    """An endpoint cannot be used: its key is not set, it does not answer, its port is taken."""
