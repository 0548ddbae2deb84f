"""Rank 0's dev evaluation during training, with its own torch threads and with those of the ranks waiting for it.

Run under torchrun on one node; rank 0 times `DevSet.evaluate` (the dev pool and queries that `annomine curriculum`
writes) on the zero-shot MiniLM two-tower both ways, in alternating rounds, while the other ranks wait at a barrier,
as they do in training.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/bench_dev_eval.py --shards warehouse/crowdflower/shards
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="folder with dev_eval.parquet and dev_pool.parquet")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from annomine.two_tower import TwoTower
    from common import Timer, emit
    from training.runner import DevSet, Dist

    dist = Dist("auto")
    model = TwoTower.from_base("minilm", shared=True, query_max_len=16, item_max_len=64)
    dev = DevSet(args.shards, 1) if dist.is_main else None
    seconds = {"own": [], "node": []}
    metrics = set()
    for _ in range(args.repeats):
        for how in seconds:
            dist.barrier()
            if dist.is_main:
                with Timer() as t, (dist.alone_on_node() if how == "node" else contextlib.nullcontext()):
                    metrics.add(round(dev.evaluate(model), 6))
                seconds[how].append(t.seconds)
            dist.barrier()
    if dist.is_main:
        what = f"{len(dev.pool_ids):,}-item dev pool, {len(dev):,} queries, {dist.world_size} ranks"
        own, node = statistics.median(seconds["own"]), statistics.median(seconds["node"])
        emit(f"dev evaluation on rank 0 with its own threads, {what}", round(own, 1), "s", rounds=seconds["own"])
        emit(f"dev evaluation on rank 0 with the waiting ranks' threads, {what}", round(node, 1), "s",
             rounds=seconds["node"], ratio=round(own / node, 2), dev_ndcg10=sorted(metrics))
    dist.close()


if __name__ == "__main__":
    main()
