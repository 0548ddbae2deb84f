"""Stage `pipeline`: every stage in order on one config, in one Spark session."""

from __future__ import annotations

import importlib
import logging
import sys
import time

from annomine.config import load_job_config, load_project_config
from annomine.runtime import job_parser, open_context, setup_logging

log = logging.getLogger("annomine.pipeline")

# (config section, job module). A stage whose module is absent is skipped with a notice.
STAGE_ORDER = [
    ("ingest", "jobs.ingest"),
    ("channels", "jobs.channels"),
    ("mine", "jobs.mine"),
    ("annotate", "jobs.annotate"),
    ("curriculum", "jobs.curriculum"),
    ("train", "jobs.train"),
    ("evaluate", "jobs.evaluate"),
]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = job_parser("annomine pipeline", __doc__)
    parser.add_argument("--only", nargs="*", help="run only these stages")
    args = parser.parse_args(argv)
    project = load_project_config(args.conf, args.overrides)
    ctx = open_context(project)
    for section, module_name in STAGE_ORDER:
        if args.only and section not in args.only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                print(f"[pipeline] {section}: not available in this version, skipped")
                continue
            raise
        _, cfg = load_job_config(args.conf, section, module.CONFIG_CLASS, args.overrides)
        started = time.time()
        print(f"[pipeline] {section}: running")
        module.run(ctx, cfg)
        print(f"[pipeline] {section}: done in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
