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
import signal
import sys
import threading


def _tie_to_launcher() -> None:
    """A rank torchrun started (here or under TorchDistributor) dies with torchrun's agent and the driver.

    SIGINT ends it at once too: a KeyboardInterrupt would wait for a gloo collective its peer left.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # inprocess (the driver itself) or Horovod
    from training.lifeline import die_with_parent

    die_with_parent()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_fn(spec: dict) -> dict:
    """Join the process group (if any), run the stages, release the model, leave the group."""
    _tie_to_launcher()
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
