"""Tier-1 judge grading speed under torch thread settings: threads and OpenMP's wait policy.

torch's CPU kernels run on OpenMP (GNU libgomp). Between parallel regions its idle threads spin (the
default, OMP_WAIT_POLICY unset: about 300,000 spins), sleep at once (PASSIVE), or spin GOMP_SPINCOUNT times and
then sleep (what `annomine` sets: PASSIVE with 3,000 spins). On cores shared with other processes a spinning
thread takes the core from the thread with work. Each setting grades the same pairs
(`CrossEncoderModel.ce_proba`, MiniLM, untrained head: speed only) in a fresh process, since libgomp reads
the policy when torch loads; the settings alternate round by round so machine load hits them alike, and
the medians and their ratios to the first setting are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (label, torch threads, OpenMP wait settings; none: libgomp's default)
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
SETTINGS = [("2 threads, OpenMP default wait (spin)", 2, {}), ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, PASSIVE),
            ("2 threads, PASSIVE after 3,000 spins (GOMP_SPINCOUNT)", 2, PASSIVE | {"GOMP_SPINCOUNT": "3000"}),
            ("1 thread", 1, {})]
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def grade_once(pairs: int, threads: int) -> float:
    """Pairs/s of one ce_proba call (run inside the child process)."""
    sys.path.insert(0, str(HERE.parent))
    import torch

    from annomine.bert import build_encoder
    from annomine.judges.cross_encoder import CrossEncoderModel
    from bench_judge import demo_pairs
    from common import Timer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer, bert = build_encoder("minilm")
    judge = CrossEncoderModel(tokenizer, bert, [1, 2, 3, 4], max_length=128, max_text_chars=400)
    df = demo_pairs(pairs)
    judge.ce_proba(df["query"].tolist()[:16], df["text"].tolist()[:16])  # warm-up
    with Timer() as t:
        judge.ce_proba(df["query"].tolist(), df["text"].tolist(), batch_size=64)
    return len(df) / t.seconds


def child(pairs: int, threads: int, waits: dict) -> float:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS} | waits
    out = subprocess.run([sys.executable, __file__, "--child", "--pairs", str(pairs), "--threads", str(threads)],
                         cwd=HERE, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["pairs_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"pairs_per_s": grade_once(args.pairs, args.threads)}))
        return
    from common import emit

    speeds: dict[str, list[float]] = {label: [] for label, _, _ in SETTINGS}
    for _ in range(args.repeats):
        for label, threads, waits in SETTINGS:
            speeds[label].append(child(args.pairs, threads, waits))
    base = statistics.median(speeds[SETTINGS[0][0]])
    for label, _, _ in SETTINGS:
        median = statistics.median(speeds[label])
        emit(f"tier-1 judge grading, {label}, MiniLM, demo-shop pairs, batch 64, {args.pairs} pairs, "
             f"{args.repeats} alternating rounds (median)", round(median, 1), "pairs/s", rounds=[round(x, 1) for x in speeds[label]])
        if label != SETTINGS[0][0]:
            emit(f"tier-1 judge grading speed, {label} / {SETTINGS[0][0]} (same run)", round(median / base, 2), "x")


if __name__ == "__main__":
    main()
