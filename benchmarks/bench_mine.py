"""Mining throughput on a generated log (benchmarks/gen_logs.py) through the embedded engine.

Runs the whole `annomine.mining.mine_candidates` pipeline (run selection, dedupe, pivot, set
logic, TF-IDF blocking + scoring, random negatives, precedence, caps) on the Parquet files and
writes the candidates to Parquet, materialising shared intermediates to Parquet like the job does. Prints log rows/s
and the peak RSS of this process (the embedded Sail engine runs in-process, so it is included).

    python benchmarks/gen_logs.py --rows 10000000 --products 1000000 --out /tmp/mine/gen10m
    python benchmarks/bench_mine.py /tmp/mine/gen10m
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from annomine.config import ProjectConfig  # noqa: E402
from annomine.mining import MiningRules, mining_report  # noqa: E402
from annomine.mining import mine_candidates  # noqa: E402
from annomine.spark import get_spark, stop_embedded  # noqa: E402
from jobs.mine import parquet_checkpoint  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", help="folder written by gen_logs.py (default: generate one per --rows)")
    ap.add_argument("--rows", type=int, nargs="*", default=[], help="generate logs of these sizes (catalog = rows / 10) and mine each")
    ap.add_argument("--max-positives", type=int, default=50)
    ap.add_argument("--max-negatives", type=int, default=50)
    ap.add_argument("--blocking-max-df", type=int, default=5000)
    ap.add_argument("--out", help="where to write the candidates (default: a temp folder, removed)")
    args = ap.parse_args(argv)
    if args.data is None:
        import subprocess

        for rows in args.rows or [1_000_000]:
            folder = Path(tempfile.mkdtemp(prefix=f"gen_{rows}_"))
            subprocess.run([sys.executable, str(Path(__file__).with_name("gen_logs.py")), "--rows", str(rows),
                            "--products", str(max(1000, rows // 10)), "--out", str(folder)], check=True)
            passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.isdigit() and a != "--rows"]
            subprocess.run([sys.executable, __file__, str(folder), *passthrough], check=True)
            shutil.rmtree(folder, ignore_errors=True)
        return 0
    data = Path(args.data)
    n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((data / "logs").glob("*.parquet")))
    n_products = pq.ParquetFile(data / "products.parquet").metadata.num_rows

    spark = get_spark(ProjectConfig())
    rules = MiningRules(max_positives=args.max_positives, max_negatives=args.max_negatives,
                        blocking_max_df=args.blocking_max_df)
    rules.validate()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_mine_")) / "candidates"
    started = time.time()
    logs = spark.read.parquet(str(data / "logs"))
    products = spark.read.parquet(str(data / "products.parquet"))
    queries = spark.read.parquet(str(data / "queries.parquet"))
    mined = mine_candidates(logs, products, queries, rules, n_products=n_products,
                            checkpoint=parquet_checkpoint(spark, out.parent / "scratch"))
    mined.write.mode("overwrite").parquet(str(out))
    seconds = time.time() - started
    written = spark.read.parquet(str(out))
    counts = {r["candidate_class"]: r["n_candidates"] for r in mining_report(written).where("dimension = 'class'").collect()}
    result = {"log_rows": n_rows, "products": n_products, "seconds": round(seconds, 1),
              "log_rows_per_s": round(n_rows / seconds), "candidates": sum(counts.values()), "per_class": counts,
              "peak_rss_mib": round(peak_rss_mib()), "max_positives": rules.max_positives,
              "max_negatives": rules.max_negatives, "blocking_max_df": rules.blocking_max_df}
    print(json.dumps(result, indent=1))
    from common import emit

    emit(f"mining throughput, {n_rows:,} log rows, {n_products:,} products, caps {rules.max_positives}/{rules.max_negatives}",
         result["log_rows_per_s"], "log rows/s", seconds=result["seconds"], candidates=result["candidates"])
    emit(f"mining peak memory (driver + embedded engine), {n_rows:,} log rows", result["peak_rss_mib"], "MiB")
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    stop_embedded()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
