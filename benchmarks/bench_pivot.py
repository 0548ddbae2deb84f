"""Mining's pivot alone, two ways, on a generated log (benchmarks/gen_logs.py), each round in a fresh process.

`cells`: `annomine.mining.pivot_channels` as the mine job runs it: one-row (query, product, channel) cells by
`min` / `max` in one aggregation, checkpointed to Parquet, and only the pairs with a repeated row by the tie
rule. `tie_rule`: `pivot_best_rows`, the tie rule's `min_by` on every row. Each writes the pivot to Parquet;
the figures are the medians of `--repeats` alternating rounds and the largest peak RSS, and the two pivots are
compared cell for cell.

    python benchmarks/gen_logs.py --rows 10000000 --products 1000000 --out /tmp/mine/gen10m
    python benchmarks/bench_pivot.py /tmp/mine/gen10m
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from annomine import mining  # noqa: E402
from annomine.config import ProjectConfig  # noqa: E402
from annomine.spark import get_spark, stop_embedded  # noqa: E402
from jobs.mine import parquet_checkpoint  # noqa: E402
from mine_duckdb import peak_rss_mib  # noqa: E402

PIVOTS = {"cells": lambda logs, checkpoint: mining.pivot_channels(logs, checkpoint),
          "tie_rule": lambda logs, checkpoint: mining.pivot_best_rows(logs)}


def one_round(data: Path, out: Path, variant: str) -> None:
    """The child: pivot the selected log rows one way, write them, print seconds and peak RSS as one JSON line."""
    spark = get_spark(ProjectConfig())
    started = time.perf_counter()
    logs = mining.select_runs(spark.read.parquet(str(data / "logs")))
    pivot = PIVOTS[variant](logs, parquet_checkpoint(spark, out.parent / f"scratch_{variant}"))
    pivot.write.mode("overwrite").parquet(str(out))
    seconds = time.perf_counter() - started
    print(json.dumps({"variant": variant, "seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mib())}), flush=True)
    stop_embedded()


def same_pivots(a: Path, b: Path) -> int:
    """Cells that differ between two pivots (NaN equal to NaN, null to null)."""
    key = ["query_id", "product_id"]
    left = pq.read_table(a).to_pandas().sort_values(key).reset_index(drop=True)
    right = pq.read_table(b).to_pandas()[list(left.columns)].sort_values(key).reset_index(drop=True)
    if len(left) != len(right):
        return abs(len(left) - len(right))
    differ = ~((left == right) | (left.isna() & right.isna()))
    return int(differ.any(axis=1).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder written by gen_logs.py")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of each way")
    ap.add_argument("--round", choices=sorted(PIVOTS), help=argparse.SUPPRESS)  # one round, in the child process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.round:
        one_round(Path(args.data), Path(args.out), args.round)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_pivot_"))
    try:
        rounds: dict[str, list[dict]] = {v: [] for v in PIVOTS}
        for _ in range(args.repeats):
            for variant in PIVOTS:
                cmd = [sys.executable, __file__, args.data, "--round", variant, "--out", str(work / variant)]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
                rounds[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        summary = {v: {"seconds": sorted(r["seconds"] for r in rs)[len(rs) // 2], "rounds": [r["seconds"] for r in rs],
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for v, rs in rounds.items()}
        summary["cells_differing"] = same_pivots(work / "cells", work / "tie_rule")
        print(json.dumps(summary, indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
