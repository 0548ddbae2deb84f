"""Launchers: one interface, the same per-rank function (`training.entry.train_fn`).

- `inprocess`: world of one in this process (tests, debugging).
- `torchrun` (the default local launcher): `python -m torch.distributed.run --nproc_per_node N -m training.entry`.
- `torch_distributor`: Spark's `TorchDistributor` (local_mode=True here, GPU workers on a cluster with
  local_mode=False, use_gpu=True). It runs on the active session: the embedded Sail Spark Connect
  session is enough in local mode (no classic SparkContext needed).
- `horovod`: the same runner with `hvd.DistributedOptimizer` (gradients averaged like DDP's, clipped
  after the average) and rank 0's parameters and optimizer state broadcast at the start
  (`training.runner.Dist`, backend 'horovod'). With an active classic SparkContext (spark-submit, a
  cluster) it runs `horovod.spark.run` on the cluster's executors, one task per rank; otherwise
  `horovod.run` starts the ranks on this machine (gloo). Horovod is an optional extra imported only
  here: `make horovod` (scripts/build_horovod.sh) builds it once (no wheel for torch 2.x exists; the
  sdist needs C++17 forced, about 10 minutes on 2 cores) and installs it from the wheel cache after that.
  Then: `annomine train --set train.launcher=horovod --set train.num_proc=2`.

Every launcher takes a `TrainSpec` and returns rank 0's result; torchrun's is read back from
`<output_dir>/result.json`. `callbacks` (training.callbacks) reach every rank of inprocess,
torch_distributor and horovod (pickled: they must pickle); torchrun gets only the spec's JSON, so it refuses them.
torchrun's agent and ranks are tied to the calling process (`annomine.lifeline`): killing the driver
(TERM, INT, HUP or KILL) ends all of them, so no orphan keeps writing the run folder a restart resumes from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from annomine.lifeline import DRIVER_PID_ENV, run_tied
from training.spec import TrainSpec

LAUNCHERS = ("inprocess", "torchrun", "torch_distributor", "horovod")


def _result(spec: TrainSpec) -> dict:
    path = Path(spec.output_dir) / "result.json"
    if not path.is_file():
        raise RuntimeError(f"training finished without a result file ({path})")
    return json.loads(path.read_text())


def launch_inprocess(spec: TrainSpec, num_proc: int = 1, callbacks=()) -> dict:
    if num_proc != 1:
        raise ValueError("the inprocess launcher runs one process; use torchrun or torch_distributor for more")
    from training.entry import train_fn

    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    try:
        return train_fn(spec, "auto", callbacks)
    finally:
        os.environ.update(saved)


def launch_torchrun(spec: TrainSpec, num_proc: int = 2, callbacks=()) -> dict:
    if callbacks:
        raise ValueError("the torchrun launcher passes only the spec (JSON) to its ranks: no callbacks; "
                         "use inprocess, torch_distributor or horovod")
    spec_path = Path(spec.output_dir) / "spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec.to_json())
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           DRIVER_PID_ENV: str(os.getpid())}
    if num_proc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_proc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_proc}",
           "-m", "training.entry", "--spec", str(spec_path)]
    # torchrun and its ranks live and die with this process (annomine.lifeline)
    returncode = run_tied(cmd, env=env, cwd=root)
    if returncode != 0:
        raise RuntimeError(f"torchrun exited with status {returncode}: {' '.join(cmd)}")
    return _result(spec)


def launch_torch_distributor(spec: TrainSpec, num_proc: int = 2, callbacks=(), use_gpu: bool = False,
                             local_mode: bool = True) -> dict:
    from pyspark.ml.torch.distributor import TorchDistributor

    from training.entry import train_fn

    TorchDistributor(num_processes=num_proc, local_mode=local_mode, use_gpu=use_gpu).run(
        train_fn, spec, "auto", list(callbacks))
    return _result(spec)


def _classic_spark_context():
    """The active classic SparkContext (spark-submit, a cluster), or None (Spark Connect, Sail, no Spark)."""
    try:
        from pyspark import SparkContext
    except ImportError:
        return None
    return SparkContext._active_spark_context


def launch_horovod(spec: TrainSpec, num_proc: int = 2, callbacks=()) -> dict:
    try:
        import horovod
        import horovod.torch  # noqa: F401 - the extension must load against this torch
    except ImportError as exc:
        raise RuntimeError("the horovod launcher needs Horovod built for this torch: run `make horovod` "
                           "(scripts/build_horovod.sh)") from exc
    from training.entry import train_fn

    args = (spec, "horovod", list(callbacks))
    if _classic_spark_context() is not None:
        import horovod.spark

        # one Spark task per rank on the executors; their environment is the cluster's
        horovod.spark.run(train_fn, args=args, num_proc=num_proc, use_gloo=True, verbose=0)
        return _result(spec)
    saved = os.environ.get("OMP_NUM_THREADS")
    if num_proc > 1 and saved is None:  # as torchrun's ranks: the cores shared out, not each rank using all
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_proc))
    try:
        horovod.run(train_fn, args=args, num_proc=num_proc, use_gloo=True, verbose=0)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return _result(spec)


def launch(launcher: str, spec: TrainSpec, num_proc: int = 1, callbacks=(), **kwargs) -> dict:
    """Run `train_fn(spec)` on `num_proc` workers with the named launcher; rank 0's result."""
    fns = {"inprocess": launch_inprocess, "torchrun": launch_torchrun,
           "torch_distributor": launch_torch_distributor, "horovod": launch_horovod}
    if launcher not in fns:
        raise ValueError(f"unknown launcher {launcher!r}; known: {list(LAUNCHERS)}")
    if not isinstance(spec, TrainSpec):
        raise TypeError(f"launch takes a training.spec.TrainSpec, got {type(spec).__name__}")
    stale = Path(spec.output_dir) / "result.json"
    if stale.exists():
        stale.unlink()
    return fns[launcher](spec, num_proc, callbacks, **kwargs)
