"""Mining throughput on a generated log (benchmarks/gen_logs.py): annomine next to DuckDB, back to back.

annomine: the whole `annomine.mining.mine_candidates` pipeline (run selection, dedupe, pivot, set
logic, TF-IDF blocking + scoring, random negatives, precedence, caps) through the embedded engine,
writing the candidates to Parquet and materialising shared intermediates like the job does, in a
fresh process per round; its peak RSS is that process's (the embedded Sail engine runs in-process). DuckDB: the same set logic
as SQL (benchmarks/mine_duckdb.py, 2 threads) in a subprocess, so its peak RSS is its own. Then the
deterministic classes (1-4; random negatives hash differently) are compared pair for pair.

    python benchmarks/gen_logs.py --rows 10000000 --products 1000000 --out /tmp/mine/gen10m
    python benchmarks/bench_mine.py /tmp/mine/gen10m
    python benchmarks/bench_mine.py --rows 1000000 10000000     # generate (catalog = rows / 10), mine, remove

Each side runs `--repeats` times (default 3), alternating, and the figures are the medians.
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

from annomine.config import ProjectConfig  # noqa: E402
from annomine.mining import MiningRules, mining_report  # noqa: E402
from annomine.mining import mine_candidates  # noqa: E402
from annomine.spark import get_spark, stop_embedded  # noqa: E402
from annomine.vocabulary import RANDOM_NEGATIVE  # noqa: E402
from jobs.mine import parquet_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent


def peak_rss_mib() -> float:
    """This process's peak RSS, the embedded engine included (VmHWM; ru_maxrss where /proc is absent)."""
    from mine_duckdb import peak_rss_mib as vm_hwm

    return vm_hwm()


def timed_checkpoint(checkpoint, timings: dict):
    """`checkpoint` that also records the seconds up to each materialisation (the stage profile)."""
    last = [time.perf_counter()]

    def wrapped(df, name):
        out = checkpoint(df, name)
        now = time.perf_counter()
        timings[name] = round(now - last[0], 2)
        last[0] = now
        return out

    return wrapped


def mine_annomine(data: Path, out: Path, rules: MiningRules, n_products: int) -> dict:
    spark = get_spark(ProjectConfig())
    timings: dict = {}
    started = time.perf_counter()
    logs = spark.read.parquet(str(data / "logs"))
    products = spark.read.parquet(str(data / "products.parquet"))
    queries = spark.read.parquet(str(data / "queries.parquet"))
    checkpoint = timed_checkpoint(parquet_checkpoint(spark, out.parent / "scratch"), timings)
    mined = mine_candidates(logs, products, queries, rules, n_products=n_products, checkpoint=checkpoint)
    mined.write.mode("overwrite").parquet(str(out))
    seconds = time.perf_counter() - started
    timings["final"] = round(seconds - sum(timings.values()), 2)
    counts = {r["candidate_class"]: r["n_candidates"]
              for r in mining_report(spark.read.parquet(str(out))).where("dimension = 'class'").collect()}
    return {"seconds": seconds, "stages": timings, "per_class": counts}


def mine_duckdb(data: Path, out: Path, rules: MiningRules, threads: int) -> dict:
    cmd = [sys.executable, str(HERE / "mine_duckdb.py"), str(data), "--out", str(out), "--threads", str(threads),
           "--max-positives", str(rules.max_positives), "--max-negatives", str(rules.max_negatives),
           "--blocking-max-df", str(rules.blocking_max_df)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(annomine_out: Path, duckdb_out: Path) -> dict:
    """Pairs of the deterministic classes (all but random negatives) found by one side only, per class,
    and the largest |token_similarity| difference over the pairs both have."""
    cols = ["query_id", "product_id", "candidate_class", "token_similarity"]
    a = pq.read_table(annomine_out, columns=cols).to_pandas()
    d = pq.read_table(duckdb_out, columns=cols).to_pandas()
    a, d = a[a.candidate_class != RANDOM_NEGATIVE], d[d.candidate_class != RANDOM_NEGATIVE]
    both = a.merge(d, on=["query_id", "product_id", "candidate_class"], how="outer", indicator=True, suffixes=("_a", "_d"))
    only = both[both["_merge"] != "both"]
    same = both[both["_merge"] == "both"]
    return {"differing_pairs": int(len(only)), "per_class": only.groupby("candidate_class").size().to_dict(),
            "compared_pairs": int(len(same)),
            "max_similarity_diff": float((same.token_similarity_a - same.token_similarity_d).abs().max() if len(same) else 0.0)}


def median_round(runs: list[dict]) -> dict:
    """The round of median seconds (its stage profile goes with it)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def alternate(data: Path, work: Path, rules: MiningRules, args) -> tuple[list, list, float]:
    """`args.repeats` rounds of annomine then DuckDB, so the machine's load hits both alike; the largest peak RSS
    of annomine's rounds."""
    ours, duck = [], []
    for r in range(args.repeats):
        ours.append(annomine_round(data, work / f"candidates{r}", args))
        if not args.annomine_only:
            duck.append(mine_duckdb(data, work / f"duckdb{r}.parquet", rules, args.threads))
    return ours, duck, max(r["peak_rss_mib"] for r in ours)


def annomine_round(data: Path, out: Path, args) -> dict:
    """One annomine round in a fresh process (its peak RSS is that round's, like DuckDB's)."""
    cmd = [sys.executable, __file__, str(data), "--round-out", str(out), "--max-positives", str(args.max_positives),
           "--max-negatives", str(args.max_negatives), "--blocking-max-df", str(args.blocking_max_df)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_round(data: Path, out: Path, args) -> None:
    """The child of `annomine_round`: mine once, print seconds, stages, classes and peak RSS as one JSON line."""
    n_products = pq.ParquetFile(data / "products.parquet").metadata.num_rows
    rules = MiningRules(max_positives=args.max_positives, max_negatives=args.max_negatives,
                        blocking_max_df=args.blocking_max_df)
    result = mine_annomine(data, out, rules, n_products)
    result["peak_rss_mib"] = round(peak_rss_mib())
    stop_embedded()
    print(json.dumps(result), flush=True)


def bench(data: Path, args) -> None:
    n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((data / "logs").glob("*.parquet")))
    n_products = pq.ParquetFile(data / "products.parquet").metadata.num_rows
    rules = MiningRules(max_positives=args.max_positives, max_negatives=args.max_negatives,
                        blocking_max_df=args.blocking_max_df)
    rules.validate()
    work = Path(tempfile.mkdtemp(prefix="bench_mine_"))
    try:
        rounds, duck_rounds, ours_peak = alternate(data, work, rules, args)
        ours = median_round(rounds)
        seconds = [round(r["seconds"], 1) for r in rounds]
        if args.annomine_only:
            print(json.dumps({"log_rows": n_rows, "seconds": round(ours["seconds"], 1), "rounds": seconds,
                              "peak_rss_mib": round(ours_peak), "stages": ours["stages"], "per_class": ours["per_class"]},
                             indent=1), flush=True)
            return
        duck = median_round(duck_rounds)
        last = args.repeats - 1
        diff = compare(work / f"candidates{last}", work / f"duckdb{last}.parquet")
        result = {"log_rows": n_rows, "products": n_products, "rounds": args.repeats,
                  "annomine": {"seconds": round(ours["seconds"], 1), "rounds": seconds,
                               "log_rows_per_s": round(n_rows / ours["seconds"]),
                               "peak_rss_mib": round(ours_peak), "stages": ours["stages"], "per_class": ours["per_class"]},
                  "duckdb": {**duck, "rounds": [r["seconds"] for r in duck_rounds],
                             "peak_rss_mib": max(r["peak_rss_mib"] for r in duck_rounds),
                             "log_rows_per_s": round(n_rows / duck["seconds"])},
                  "comparison": diff}
        result["ratio"] = round(result["annomine"]["log_rows_per_s"] / result["duckdb"]["log_rows_per_s"], 3)
        print(json.dumps(result, indent=1), flush=True)
        emit_figures(result, rules, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def emit_figures(result: dict, rules: MiningRules, args) -> None:
    from common import emit

    n_rows, n_products, n = result["log_rows"], result["products"], result["rounds"]
    size = f"{n_rows:,} log rows, {n_products:,} products, caps {rules.max_positives}/{rules.max_negatives}"
    of = f", median of {n} alternating rounds" if n > 1 else ""
    a, d, diff = result["annomine"], result["duckdb"], result["comparison"]
    emit(f"mining throughput, {size}{of}", a["log_rows_per_s"], "log rows/s", seconds=a["seconds"],
         rounds=a["rounds"], candidates=sum(a["per_class"].values()))
    emit(f"mining peak memory (driver + embedded engine), {n_rows:,} log rows", a["peak_rss_mib"], "MiB")
    emit(f"mining throughput, DuckDB {args.threads} threads, {size}{of}", d["log_rows_per_s"], "log rows/s",
         seconds=d["seconds"], rounds=d["rounds"])
    emit(f"mining peak memory, DuckDB {args.threads} threads (subprocess), {n_rows:,} log rows", d["peak_rss_mib"], "MiB")
    emit(f"mining throughput ratio annomine/DuckDB, {n_rows:,} log rows (medians of the same run)", result["ratio"], "x")
    emit(f"mining classes 1-4 pairs differing from DuckDB, {n_rows:,} log rows", diff["differing_pairs"], "pairs",
         compared=diff["compared_pairs"], max_similarity_diff=diff["max_similarity_diff"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", help="folder written by gen_logs.py (default: generate one per --rows)")
    ap.add_argument("--rows", type=int, nargs="*", default=[], help="generate logs of these sizes (catalog = rows / 10) and mine each")
    ap.add_argument("--max-positives", type=int, default=50)
    ap.add_argument("--max-negatives", type=int, default=50)
    ap.add_argument("--blocking-max-df", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    ap.add_argument("--repeats", type=int, default=3,
                    help="alternating rounds of each side; the figures are their medians (a shared machine's load varies)")
    ap.add_argument("--annomine-only", action="store_true",
                    help="time annomine's mining alone (its stage profile and peak memory; no DuckDB side, no figures "
                         "for benchmarks/run.py): to compare two versions of the code on the same log")
    ap.add_argument("--round-out", help=argparse.SUPPRESS)  # one annomine round, in the child process
    args = ap.parse_args(argv)
    if args.round_out:
        one_round(Path(args.data), Path(args.round_out), args)
        return 0
    if args.data is not None:
        bench(Path(args.data), args)
        return 0
    passthrough = ["--max-positives", str(args.max_positives), "--max-negatives", str(args.max_negatives),
                   "--blocking-max-df", str(args.blocking_max_df), "--threads", str(args.threads),
                   "--repeats", str(args.repeats), *(["--annomine-only"] if args.annomine_only else [])]
    for rows in args.rows or [1_000_000]:
        folder = Path(tempfile.mkdtemp(prefix=f"gen_{rows}_"))
        try:
            subprocess.run([sys.executable, str(HERE / "gen_logs.py"), "--rows", str(rows),
                            "--products", str(max(1000, rows // 10)), "--out", str(folder)], check=True)
            # a fresh process per size: its peak RSS is that size's
            subprocess.run([sys.executable, __file__, str(folder), *passthrough], check=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
