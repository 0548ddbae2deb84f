"""What every job entry point shares: argument parsing, config loading, session and tables."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import TypeVar

from annomine import quiet
from annomine.config import ProjectConfig, load_job_config
from annomine.spark import get_spark
from annomine.tables import TableStore

T = TypeVar("T")

DEFAULT_CONF = "conf/local.yaml"


def setup_logging(verbose: bool | None = None) -> None:
    """Log to stderr; quiet libraries unless `verbose` (default: $ANNOMINE_VERBOSE). A job's
    `--verbose` (job_parser) turns verbose on while its arguments are parsed."""
    logging.basicConfig(
        level=os.environ.get("ANNOMINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet.apply(quiet.env_verbose() if verbose is None else verbose)


class _Verbose(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        quiet.apply(True)


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--conf", default=os.environ.get("ANNOMINE_CONF", DEFAULT_CONF),
                        help="config file (default: $ANNOMINE_CONF or conf/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set mine.max_positives=20")
    parser.add_argument("--verbose", action=_Verbose, nargs=0, default=quiet.env_verbose(),
                        help="also show the engine's, loaders' and libraries' logs and warnings "
                             "(default: quiet; $ANNOMINE_VERBOSE=1 also turns it on)")
    return parser


@dataclass
class JobContext:
    project: ProjectConfig
    spark: object
    tables: TableStore


def open_context(project: ProjectConfig) -> JobContext:
    """Start (or join) the Spark session and register the existing tables."""
    spark = get_spark(project)
    tables = TableStore(spark, project)
    tables.register_all()
    return JobContext(project, spark, tables)


def load(args: argparse.Namespace, section: str, cls: type[T]) -> tuple[ProjectConfig, T]:
    return load_job_config(args.conf, section, cls, args.overrides)


def run_job(stage: str, description: str, cls: type[T], run, argv: list[str] | None = None) -> int:
    """The whole `main` of a job with no options beyond --conf/--set: parse, load, open, run."""
    setup_logging()
    args = job_parser(f"annomine {stage}", description).parse_args(argv)
    project, cfg = load(args, stage, cls)
    run(open_context(project), cfg)
    return 0
