"""Launchers: one interface, the same per-rank function (`training.entry.train_fn`).

- `inprocess`: world of one in this process (tests, debugging).
- `torchrun` (the default local launcher): `python -m torch.distributed.run --nproc_per_node N -m training.entry`.
- `torch_distributor`: Spark's `TorchDistributor` (local_mode=True here, GPU workers on a cluster with
  local_mode=False, use_gpu=True). It runs on the active session: the embedded Sail Spark Connect
  session is enough in local mode (no classic SparkContext needed).
- `horovod`: `horovod.run(train_fn, np=N)`; an optional extra imported only here (and in
  `training.runner.Dist` for backend 'horovod'). Horovod is not installed here; its tests skip
  without it. Build recipe (CPU/gloo, ~10 minutes; torch 2.x headers need C++17, Horovod 0.28 asks for 14):

      pip download --no-deps --no-binary :all: horovod==0.28.1 && tar xzf horovod-0.28.1.tar.gz
      cd horovod-0.28.1
      sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' CMakeLists.txt
      grep -rl 'c++14' horovod/torch/CMakeLists.txt | xargs -r sed -i 's/c++14/c++17/g'
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 pip install --no-build-isolation --no-cache-dir .
      # then: annomine train --set train.launcher=horovod --set train.num_proc=2

Every launcher takes a `TrainSpec` and returns rank 0's result; torchrun's is read back from
`<output_dir>/result.json`. `callbacks` (training.callbacks) reach every rank of inprocess,
torch_distributor and horovod (pickled: they must pickle); torchrun gets only the spec's JSON, so it refuses them.
torchrun's agent and ranks are tied to the calling process (`training.lifeline`): killing the driver
(TERM, INT, HUP or KILL) ends all of them, so no orphan keeps writing the run folder a restart resumes from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from training.lifeline import DRIVER_PID_ENV, run_tied
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
    # torchrun and its ranks live and die with this process (training.lifeline)
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


def launch_horovod(spec: TrainSpec, num_proc: int = 2, callbacks=()) -> dict:
    try:
        import horovod
    except ImportError as exc:
        raise RuntimeError("the horovod launcher needs Horovod (optional extra); see the build recipe in this module's docstring") from exc
    from training.entry import train_fn

    horovod.run(train_fn, args=(spec, "horovod", list(callbacks)), np=num_proc, use_gloo=True)
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
