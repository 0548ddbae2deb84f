"""The per-rank training function every launcher runs: `train_fn(spec, backend, callbacks) -> result`.

`spec` is a `training.spec.TrainSpec` (built by `jobs/train.py: build_spec`): pickled by TorchDistributor
and Horovod, a JSON file for torchrun
(`python -m torch.distributed.run --nproc_per_node 2 -m training.entry --spec spec.json`).
`backend` is the launcher's business ('horovod' under Horovod, else 'auto'), `callbacks` the caller's
hooks (training.callbacks); neither is part of the spec.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a rank starts, after the environment below is set
    from training.spec import TrainSpec


def _tie_to_launcher() -> None:
    """A rank torchrun started (here or under TorchDistributor) dies with torchrun's agent and the driver.

    SIGINT ends it at once too: a KeyboardInterrupt would wait for a gloo collective its peer left.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # inprocess (the driver itself) or Horovod
    from annomine.lifeline import die_with_parent

    die_with_parent()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def _quiet_logging() -> None:
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


def train_fn(spec: TrainSpec, backend: str = "auto", callbacks=()) -> dict:
    """Join the process group (if any), run the stages, release the model, leave the group."""
    _tie_to_launcher()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from training.runner import Dist, run_stages

    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    _quiet_logging()
    dist = Dist(backend)  # progress bars and dev evaluation are rank 0's only (training.runner)
    try:
        result = run_stages(spec, dist, callbacks)
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
    from training.spec import TrainSpec

    with open(args.spec, encoding="utf-8") as fh:
        spec = TrainSpec.from_json(fh.read(), where=args.spec)
    train_fn(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
