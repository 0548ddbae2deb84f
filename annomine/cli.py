"""`annomine <stage> [args]`: a thin dispatcher over the `jobs/` entry points.

A user-facing error (`annomine.errors.AnnomineError`: a bad config, a bad input file, a refused key)
is printed as one line and the exit status is 2; `--debug` (or ANNOMINE_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable

from annomine.errors import AnnomineError
from annomine.stages import BY_NAME, STAGES

USER_ERROR_EXIT = 2


def usage() -> str:
    lines = ["usage: annomine <stage> [--conf conf/local.yaml] [--set section.key=value] [--debug] ...", "",
             "stages:"]
    width = max(len(s.name) for s in STAGES)
    lines += [f"  {s.name.ljust(width)}  {s.description}" for s in STAGES]
    lines.append("\n`annomine <stage> --help` shows a stage's options.")
    return "\n".join(lines)


def one_line(message: str) -> str:
    """`message` on one line: its lines (an embedded tool's output, say) joined with ' | '."""
    return " | ".join(line.strip() for line in message.splitlines() if line.strip())


def guarded(prog: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's `main(argv)`; a user-facing error becomes one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ANNOMINE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(main(argv) or 0)
    except AnnomineError as exc:
        return _report(prog, exc, debug)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user_error = _user_error_behind(exc)
        if user_error is None:
            raise
        return _report(prog, user_error, debug)


def _user_error_behind(exc: Exception) -> AnnomineError | None:
    """The user-facing cause of an engine failure (a damaged table file), else None: a bug keeps its traceback."""
    if "annomine.tables" not in sys.modules:  # no table was opened
        return None
    from annomine.tables import damaged_table_error

    return damaged_table_error(exc)


def _report(prog: str, exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
    if not debug:
        print(f"{prog}: (--debug shows the traceback; docs/troubleshooting.md says what errors mean)",
              file=sys.stderr)
    return USER_ERROR_EXIT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from annomine import __version__

        print(__version__)
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in BY_NAME:
        print(f"annomine: unknown stage '{stage}'\n\n{usage()}", file=sys.stderr)
        return USER_ERROR_EXIT
    module = importlib.import_module(BY_NAME[stage].module)
    try:
        return guarded(f"annomine {stage}", module.main, rest)
    finally:
        from annomine.spark import stop_embedded

        stop_embedded()


if __name__ == "__main__":
    sys.exit(main())
