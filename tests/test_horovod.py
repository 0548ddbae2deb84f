"""Horovod trains what torchrun trains: the same runner, shards and seeds under `train.launcher=horovod`
(`hvd.DistributedOptimizer`, rank 0's parameters and optimizer state broadcast) and under torchrun (DDP)
give the same per-step losses, epoch losses, dev NDCG and final weights.

Why they can agree to float precision: both average gradients over the ranks (DDP divides by the world
size before its allreduce sum, Horovod's Average divides the sum after it; with 2 ranks a/2 + b/2 and
(a + b)/2 are the same float, and a sum of two terms does not depend on order), both clip the averaged
gradients (the runner calls Horovod's `synchronize` before clipping), and both ranks see the same shard
rows in the same order. What can still differ is how each library buckets and fuses gradients before
the reduction, which changes nothing elementwise, and the kernels' thread count, pinned to 1 here; so
the tolerance is a float32 rounding margin (1e-5), not a loose one. Measured on 2 CPU cores (gloo,
2026-12-01): every step's loss and every final weight are bit-identical (difference 0.0).

Two runner bugs this test found: Horovod's `broadcast_optimizer_state` on a fresh AdamW takes a
zero-gradient step (weight decay, step count 1) that DDP never takes, and Horovod's `zero_grad` takes no
`set_to_none` argument (training.runner.Dist.wrap, StageTrainer._step).

Horovod is built by `make horovod` (scripts/build_horovod.sh; `make test` depends on it, so CI runs these).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from annomine.two_tower import TwoTower
from tests.test_training import DumpParams, make_shards
from training.launchers import launch

hvd = pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod` (CI does, via make test)")

STAGES = [("easy", "bce"), ("hard", "mnr")]


def _history(out: Path) -> tuple[list, list]:
    history = json.loads((out / "history.json").read_text())
    steps = [(h["step"], h["stage"], h["train_loss"], h["lr"]) for h in history["steps"]]
    epochs = [(h["step"], h["stage"], h["epoch"], h["epoch_loss"], h["dev_ndcg10"]) for h in history["epochs"]]
    return steps, epochs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two stages, 2 epochs each, 2 ranks, batch 4 per rank: 4 steps per epoch, 16 steps in all."""
    root = tmp_path_factory.mktemp("hvd")
    # lr 1e-3 and no start-versus-epochs selection: the weights must move, and the final model is trained
    spec = replace(make_shards(root, n=32, stages=STAGES), batch_size=4, log_every=1, threads=1, lr=1e-3,
                   keep_start_if_better=False)
    results = {}
    for launcher in ("torchrun", "horovod"):
        run_spec = replace(spec, output_dir=str(root / launcher))
        callbacks = [DumpParams()] if launcher == "horovod" else []
        results[launcher] = (launch(launcher, run_spec, num_proc=2, callbacks=callbacks), Path(run_spec.output_dir))
    return results


@pytest.fixture(scope="module", autouse=True)
def _by_value():
    """DumpParams crosses into Horovod's processes pickled by value (they cannot import the test modules)."""
    import cloudpickle

    import tests.test_training as mod
    cloudpickle.register_pickle_by_value(mod)
    yield
    cloudpickle.unregister_pickle_by_value(mod)


def test_horovod_and_torchrun_train_the_same_losses_and_weights(runs):
    (r_torch, out_torch), (r_hvd, out_hvd) = runs["torchrun"], runs["horovod"]
    assert r_torch["world_size"] == r_hvd["world_size"] == 2
    steps_t, epochs_t = _history(out_torch)
    steps_h, epochs_h = _history(out_hvd)
    assert len(steps_t) == 16 and [s[:2] for s in steps_h] == [s[:2] for s in steps_t]
    np.testing.assert_allclose([s[2:] for s in steps_h], [s[2:] for s in steps_t], rtol=0, atol=1e-5)
    print("max |loss difference| per step:", max(abs(a[2] - b[2]) for a, b in zip(steps_h, steps_t)))
    assert [e[:3] for e in epochs_h] == [e[:3] for e in epochs_t] and len(epochs_t) == 4
    np.testing.assert_allclose([e[3:] for e in epochs_h], [e[3:] for e in epochs_t], rtol=0, atol=1e-5)
    # the losses moved: a run that trained nothing would agree trivially
    assert len({round(s[2], 4) for s in steps_t}) > 4
    final_t, final_h = TwoTower.load(r_torch["final_dir"]), TwoTower.load(r_hvd["final_dir"])
    start = TwoTower.tiny()
    moved = worst = 0.0
    for p, q, s in zip(final_t.parameters(), final_h.parameters(), start.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-5)
        worst = max(worst, float((q - p).detach().abs().max()))
        moved = max(moved, float((p - s).detach().abs().max()))
    print("max |weight difference|:", worst)
    assert moved > 1e-3, "training should have changed the weights"
    assert r_torch["examples"] == r_hvd["examples"] == 2 * 2 * 2 * 4 * 4  # stages x epochs x ranks x steps x batch
    assert [s["best_epoch"] for s in r_hvd["stages"]] == [s["best_epoch"] for s in r_torch["stages"]]


def test_horovod_ranks_hold_identical_parameters_after_every_epoch(runs):
    _, out = runs["horovod"]
    dumps = sorted(out.glob("params_*_rank0.pt"))
    assert len(dumps) == 4  # 2 stages x 2 epochs
    for rank0 in dumps:
        rank1 = rank0.with_name(rank0.name.replace("rank0", "rank1"))
        assert torch.equal(torch.load(rank0), torch.load(rank1)), rank0.name
