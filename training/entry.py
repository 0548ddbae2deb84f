"""The per-rank training function every launcher runs: `train_fn(spec) -> result`.

`spec` is a plain JSON-able dict (see `jobs/train.py: build_spec`), so it crosses process boundaries
unchanged: pickled by TorchDistributor and Horovod, a JSON file for torchrun
(`python -m torch.distributed.run --nproc_per_node 2 -m training.entry --spec spec.json`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys


def train_fn(spec: dict) -> dict:
    """Join the process group (if any), run the stages, release the model, leave the group."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from training.runner import Dist, run_stages

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    logging.basicConfig(level=os.environ.get("ANNOMINE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("urllib3", "filelock", "alembic", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    dist = Dist(spec.get("backend", "auto"))
    if not dist.is_main:
        spec = {**spec, "progress": False}
    try:
        result = run_stages(spec, dist)
        result["rank"] = dist.rank
        return result
    finally:
        # free DDP buffers before the group closes: gloo workers can hang at exit otherwise
        gc.collect()
        dist.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.entry", description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON file written by `annomine train`")
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    train_fn(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
