"""torchrun (DDP) against Horovod on the same tiny training: examples/s of each launcher.

    python benchmarks/bench_launchers.py [--rows 64] [--batch 8] [--num-proc 2]

The tiny random BERT of the tests (`base_model: tiny`), two stages (BCE, MNR), two epochs each, the same
shards and seeds for both launchers; examples/s is the runner's own (training steps only, dev evaluation
and process start excluded), and the wall time includes starting the ranks. Needs Horovod (`make horovod`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args()
    from tests.test_training import make_shards
    from training.launchers import launch

    with tempfile.TemporaryDirectory() as tmp:
        spec = replace(make_shards(Path(tmp), n=args.rows, stages=[("easy", "bce"), ("hard", "mnr")]),
                       batch_size=args.batch, threads=1, log_every=1000)
        for launcher in ("torchrun", "horovod"):
            t0 = time.time()
            result = launch(launcher, replace(spec, output_dir=f"{tmp}/{launcher}"), num_proc=args.num_proc)
            wall = time.time() - t0
            emit(f"tiny two-tower, 2 stages x 2 epochs, {launcher} x{args.num_proc}", round(result["examples_per_s"], 1),
                 "examples/s", wall_s=round(wall, 1), examples=result["examples"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
