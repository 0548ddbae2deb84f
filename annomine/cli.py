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


def guarded(prog: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's `main(argv)`; a user-facing error becomes one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ANNOMINE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(main(argv) or 0)
    except AnnomineError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        if not debug:
            print(f"{prog}: (--debug shows the traceback; README, 'Troubleshooting', says what errors mean)",
                  file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


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
