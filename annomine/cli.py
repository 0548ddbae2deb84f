"""`annomine <stage> [args]`: a thin dispatcher over the `jobs/` entry points."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "ingest": ("jobs.ingest", "products, queries, labels (and users' retrieval logs) into bronze Delta tables"),
    "channels": ("jobs.channels", "run the lexical, BM25 and ANN channels into retrieval_logs"),
    "mine": ("jobs.mine", "set logic over the channels into five difficulty levels"),
    "judge": ("jobs.judge", "train / evaluate / calibrate the relevance judge cascade"),
    "annotate": ("jobs.annotate", "grade mined candidates with the judge cascade"),
    "curriculum": ("jobs.curriculum", "per-stage training sets as Delta tables and Parquet shards"),
    "train": ("jobs.train", "train the two-tower retriever through the curriculum"),
    "evaluate": ("jobs.evaluate", "FAISS retrieval + NDCG@10 on human labels, against baselines"),
    "pipeline": ("jobs.pipeline", "every stage in order, skipping those whose outputs are current"),
    "llm-server": ("jobs.llm_server", "a loopback OpenAI-compatible server (tests and the demo)"),
    "sql": ("annomine.sql_runner", "create the curated views and run the example queries in sql/"),
}


def usage() -> str:
    lines = ["usage: annomine <stage> [--conf conf/local.yaml] [--set section.key=value] ...", "", "stages:"]
    width = max(len(s) for s in STAGES)
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in STAGES.items()]
    lines.append("\n`annomine <stage> --help` shows a stage's options.")
    return "\n".join(lines)


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
    if stage not in STAGES:
        print(f"annomine: unknown stage '{stage}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    try:
        return int(module.main(rest) or 0)
    finally:
        from annomine.spark import stop_embedded

        stop_embedded()


if __name__ == "__main__":
    sys.exit(main())
