"""Training across a standalone Spark cluster: TorchDistributor (`local_mode=False`) and Horovod on Spark
(`horovod.spark.run`) run the two ranks as tasks on two workers' executors, submitted with `spark-submit
--master spark://...`, and train what torchrun trains on the same shards: the same per-step losses, epoch
losses and final weights (the float32 margin of tests/test_horovod.py). The ranks' tasks are read from Spark's
event log: one per executor, on both executors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from annomine.two_tower import TwoTower
from tests.cluster import StandaloneCluster
from tests.test_cluster import SPARK_SUBMIT, _executors_by_stage, _java, assert_all_gone, spark_submit
from tests.test_horovod import _history
from tests.test_training import make_shards
from training.launchers import launch

ROOT = Path(__file__).resolve().parents[1]
STAGES = [("easy", "bce"), ("hard", "mnr")]
LAUNCHERS = ["torch_distributor"]
try:
    import horovod.spark  # noqa: F401
    import horovod.torch  # noqa: F401

    LAUNCHERS.append("horovod")
except ImportError:  # built by `make horovod` (CI does, via make test)
    pass

pytestmark = pytest.mark.skipif(not (_java() and Path(SPARK_SUBMIT).is_file()),
                                reason="a standalone cluster needs Java 17 and pyspark's spark-submit")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-train")
    return replace(make_shards(root, n=32, stages=STAGES), batch_size=4, log_every=1, threads=1, lr=1e-3,
                   keep_start_if_better=False)


@pytest.fixture(scope="module")
def reference(spec):
    run_spec = replace(spec, output_dir=str(Path(spec.output_dir).parent / "torchrun"))
    return launch("torchrun", run_spec, num_proc=2), Path(run_spec.output_dir)


@pytest.fixture(scope="module")
def cluster():
    started = StandaloneCluster.start(workers=2, cores=1, memory="2g")
    try:
        yield started
    finally:
        started.stop()
        assert_all_gone(started.groups, started.master_port, timeout_s=5)


def _submit_training(cluster: StandaloneCluster, spec, launcher: str, folder: Path) -> tuple[dict, Path, Path]:
    folder.mkdir(parents=True)
    run_spec = replace(spec, output_dir=str(folder / "out"))
    (folder / "spec.json").write_text(run_spec.to_json())
    events = folder / "events"
    events.mkdir()
    spark_submit(cluster, ["tests/cluster_train.py", str(folder / "spec.json"), launcher, str(folder / "result.json")],
                 {"spark.eventLog.dir": events.as_uri(), "spark.task.maxFailures": "1"},
                 ("PYTHONPATH", "TOKENIZERS_PARALLELISM"))
    return json.loads((folder / "result.json").read_text()), Path(run_spec.output_dir), events


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_training_on_the_cluster_matches_torchrun(launcher, cluster, spec, reference, tmp_path):
    result, out, events = _submit_training(cluster, spec, launcher, tmp_path / launcher)
    ref, ref_out = reference
    assert result["world_size"] == ref["world_size"] == 2
    # the two ranks ran as tasks of one stage, one on each worker's executor
    stages = {name: ids for name, ids in _executors_by_stage(events).items() if len(ids) == 2}
    assert stages, f"no stage ran on both executors: {_executors_by_stage(events)}"
    steps_c, epochs_c = _history(out)
    steps_t, epochs_t = _history(ref_out)
    assert len(steps_t) == 16 and [s[:2] for s in steps_c] == [s[:2] for s in steps_t]
    np.testing.assert_allclose([s[2:] for s in steps_c], [s[2:] for s in steps_t], rtol=0, atol=1e-5)
    np.testing.assert_allclose([e[3:] for e in epochs_c], [e[3:] for e in epochs_t], rtol=0, atol=1e-5)
    assert len({round(s[2], 4) for s in steps_t}) > 4, "the losses moved"
    start = TwoTower.tiny()
    moved = 0.0
    for p, q, s in zip(TwoTower.load(ref["final_dir"]).parameters(), TwoTower.load(result["final_dir"]).parameters(),
                       start.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-5)
        moved = max(moved, float((p - s).detach().abs().max()))
    assert moved > 1e-3, "training should have changed the weights"
    assert result["examples"] == ref["examples"]
