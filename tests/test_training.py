"""Two-tower training with a tiny random BERT: stages, checkpoints, resume, DDP sync, the CLI jobs, MLflow,
the typed spec, and a loss defined here that trains through the runner without touching any other module."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from annomine.config import ConfigError
from annomine.publish import read_pointer
from annomine.two_tower import TwoTower
from training.callbacks import Callback
from training.launchers import launch
from training.losses import REGISTRY, PointwiseLoss, register
from training.interpolation import interpolate
from training.runner import DevSet, ndcg_at_k
from training.shards import write_manifest, write_stage_shards
from training.spec import TrainSpec, Tracking

STAGES = [("easy", "bce"), ("hard", "mnr"), ("ts", "triplet"), ("roar", "roar")]


def make_shards(root: Path, n: int = 32, stages=STAGES, variant: str = "v") -> TrainSpec:
    recs = []
    for i in range(n):
        recs.append(dict(query_id=f"q{i % 8}", query=f"red shoe {i % 8}", product_id=f"p{i}", item_text=f"red shoe item {i}",
                         label=i % 2, grade=3 + i % 2, candidate_class="easy_positive", level=1, neg_product_id=f"n{i}",
                         neg_text=f"blue lamp {i}", neg_grade=1, neg_class="token_similar_negative", neg_level=4,
                         group_product_ids=[f"p{i}", f"n{i}", f"m{i}"], group_texts=[f"red shoe {i}", f"blue lamp {i}", "mug"],
                         group_grades=[4, 2, 1]))
    df = pd.DataFrame(recs)
    entries = []
    for k, (name, loss) in enumerate(stages, start=1):
        e = write_stage_shards(df, root / variant / f"stage{k}_{name}", num_files=2, row_group_size=8)
        e.update(stage=k, name=name, loss=loss, folder=f"stage{k}_{name}", epochs=None)
        entries.append(e)
    write_manifest(root / variant, {"variant": variant, "stages": entries})
    pd.DataFrame({"query_id": ["q1", "q1", "q2"], "query": ["red shoe 1", "red shoe 1", "red shoe 2"],
                  "product_id": ["p1", "p9", "p2"], "grade": [4, 2, 3]}).to_parquet(root / "dev_eval.parquet")
    pd.DataFrame({"product_id": [f"p{i}" for i in range(20)],
                  "text": [f"red shoe item {i}" for i in range(20)]}).to_parquet(root / "dev_pool.parquet")
    return TrainSpec(shards_root=str(root / variant), dev_dir=str(root), output_dir=str(root / "out"), min_grade=1,
                     base_model="tiny", batch_size=8, epochs_per_stage=2, log_every=2, progress=False, seed=3,
                     checkpoint_every_batches=0)


class FailAfter(Callback):
    """Crash injection: after global step `step`, or after (stage, epoch) `epoch` (its checkpoint committed)."""

    def __init__(self, step: int | None = None, epoch: tuple[int, int] | None = None):
        self.step, self.epoch = step, epoch

    def on_step(self, trainer, batch: int) -> None:
        if trainer.run.global_step == self.step:
            trainer.run.dist.barrier()  # every rank's checkpoint is committed before any rank fails
            raise RuntimeError(f"injected failure after step {self.step}")

    def on_epoch_end(self, trainer, epoch: int) -> None:
        if (trainer.entry["stage"], epoch) == self.epoch:
            raise RuntimeError(f"injected failure after stage {self.epoch[0]} epoch {epoch}")


class DumpParams(Callback):
    """Every rank saves its flattened parameters after each epoch (the DDP sync tests)."""

    def on_epoch_end(self, trainer, epoch: int) -> None:
        flat = torch.cat([p.detach().float().cpu().reshape(-1) for p in trainer.module.parameters()])
        torch.save(flat, trainer.run.out / f"params_{trainer.key}_epoch{epoch}_rank{trainer.run.dist.rank}.pt")


@pytest.fixture
def callbacks_by_value():
    """Callbacks defined here cross into TorchDistributor's and Horovod's processes pickled by value (those
    processes cannot import this test module)."""
    picklers = []
    for name in ("pyspark.cloudpickle", "cloudpickle"):
        try:
            picklers.append(__import__(name, fromlist=["register_pickle_by_value"]))
        except ImportError:
            pass
    for p in picklers:
        p.register_pickle_by_value(sys.modules[__name__])
    yield
    for p in picklers:
        p.unregister_pickle_by_value(sys.modules[__name__])


def test_model_round_trip_and_normalised_output(tmp_path):
    for shared in (True, False):
        m = TwoTower.tiny(shared=shared)
        q, d = m.encode_queries(["red shoe", "lamp"]), m.encode_items(["red shoe"] * 3, batch_size=2)
        assert q.dtype == np.float32 and q.shape == (2, 32) and d.shape == (3, 32)
        assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
        m.save(tmp_path / str(shared))
        back = TwoTower.load(tmp_path / str(shared))
        assert back.shared == shared and np.allclose(back.encode_items(["red shoe"]), d[:1], atol=1e-6)
        # separate towers really are separate
        assert shared or not np.allclose(m.encode_queries(["red shoe"]), m.encode_items(["red shoe"]))


def test_ndcg_hand_computed():
    scores = np.array([[0.9, 0.8, 0.1]])
    gains = np.array([[0.0, 3.0, 1.0]])
    dcg = (2 ** 0 - 1) / np.log2(2) + (2 ** 3 - 1) / np.log2(3) + (2 ** 1 - 1) / np.log2(4)
    idcg = (2 ** 3 - 1) / np.log2(2) + (2 ** 1 - 1) / np.log2(3)
    assert ndcg_at_k(scores, gains, [np.array([3.0, 1.0])], k=10) == pytest.approx(dcg / idcg)


def test_rank_zero_evaluates_with_the_threads_of_the_ranks_waiting_for_it(monkeypatch):
    """Dev evaluation runs on rank 0 alone while the node's other ranks wait: on CPU it takes their torch
    threads for the evaluation and goes back to its own share after (an error included)."""
    from training.runner import Dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    dist = Dist("auto")
    own = torch.get_num_threads()
    with dist.alone_on_node():
        assert torch.get_num_threads() == own  # a world of one: nothing to take
    dist.local_world_size = 2
    try:
        with dist.alone_on_node():
            assert torch.get_num_threads() == own * 2
            raise RuntimeError("evaluation failed")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == own


def test_stages_checkpoints_and_resume_after_crash(tmp_path):
    spec = make_shards(tmp_path, n=16)
    with pytest.raises(RuntimeError, match="injected failure"):
        launch("inprocess", spec, callbacks=[FailAfter(epoch=(2, 1))])
    out = Path(spec.output_dir)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["stages"]["stage1_easy"]["done"] and progress["stages"]["stage2_hard"]["last_epoch"] == 1
    stage1_best = (out / "stage1_easy" / "best" / "query" / "model.safetensors").stat().st_mtime_ns
    result = launch("inprocess", spec)
    # stage 1 was not re-trained; stage 2 resumed at epoch 2; every stage finished
    assert (out / "stage1_easy" / "best" / "query" / "model.safetensors").stat().st_mtime_ns == stage1_best
    history = json.loads((out / "history.json").read_text())
    stage2_epochs = [e["epoch"] for e in history["epochs"] if e["stage"] == 2]
    assert stage2_epochs == [1, 2]
    assert [s["loss"] for s in result["stages"]] == ["bce", "mnr", "triplet", "roar"]
    assert all(s["done"] and 0.0 <= s["best_metric"] <= 1.0 for s in result["stages"])
    model = TwoTower.load(result["final_dir"])
    assert model.encode_queries(["red shoe"]).shape == (1, 32)
    assert any(h.get("bce_temperature") not in (None, 20.0) for h in history["steps"])


def _losses(out: Path) -> tuple[list, list]:
    history = json.loads((out / "history.json").read_text())
    steps = [(h["step"], h["stage"], h["train_loss"], h.get("bce_temperature", 0.0)) for h in history["steps"]]
    epochs = [(h["step"], h["stage"], h["epoch"], h["epoch_loss"], h["dev_ndcg10"]) for h in history["epochs"]]
    return steps, epochs


def _assert_same_training(a: tuple[dict, Path], b: tuple[dict, Path]) -> None:
    (ra, out_a), (rb, out_b) = a, b
    steps_a, epochs_a = _losses(out_a)
    steps_b, epochs_b = _losses(out_b)
    assert [s[:2] for s in steps_a] == [s[:2] for s in steps_b] and len(steps_a) == 24
    np.testing.assert_allclose([s[2:] for s in steps_b], [s[2:] for s in steps_a], rtol=0, atol=1e-5)
    assert [e[:3] for e in epochs_a] == [e[:3] for e in epochs_b]
    np.testing.assert_allclose([e[3:] for e in epochs_b], [e[3:] for e in epochs_a], rtol=0, atol=1e-5)
    for p, q in zip(TwoTower.load(ra["final_dir"]).parameters(), TwoTower.load(rb["final_dir"]).parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert ra["examples"] == rb["examples"] == 2 * 2 * 24
    assert [s["examples"] for s in ra["stages"]] == [s["examples"] for s in rb["stages"]] == [48, 48]


def test_a_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    """Interrupted at a stage boundary, then between two batch checkpoints, and resumed each time: the same
    batches in the same order (dropout included), so the same losses, weights and example count."""
    spec = make_shards(tmp_path, n=24, stages=[("easy", "bce"), ("hard", "mnr")])
    spec = replace(spec, batch_size=4, log_every=1, checkpoint_every_batches=2)  # 6 steps per epoch, 2 epochs per stage

    def at(name: str) -> TrainSpec:
        return replace(spec, output_dir=str(tmp_path / name))

    clean = launch("inprocess", at("clean"))
    with pytest.raises(RuntimeError, match="injected failure after stage 1 epoch 2"):
        launch("inprocess", at("resumed"), callbacks=[FailAfter(epoch=(1, 2))])
    # stage 2, epoch 1, batch 5: the last checkpoint is after batch 4, so batch 5 is trained again
    with pytest.raises(RuntimeError, match="injected failure after step 17"):
        launch("inprocess", at("resumed"), callbacks=[FailAfter(step=17)])
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert progress["global_step"] == 16
    assert progress["stages"]["stage2_hard"]["checkpoint"]["batch"] == 4
    resumed = launch("inprocess", at("resumed"))
    assert resumed["examples_this_run"] == 6 * 4 + 2 * 4  # only what the checkpoints did not hold
    _assert_same_training((clean, tmp_path / "clean"), (resumed, tmp_path / "resumed"))
    assert sorted(p.name for p in (tmp_path / "resumed" / "stage2_hard").iterdir()) == ["best", "epoch2"]


def test_a_stage_that_does_not_beat_its_starting_weights_is_dropped(tmp_path):
    """lr 0 for the BCE stage: its epochs score exactly what it started from, so its best is the start."""
    spec = make_shards(tmp_path, n=16, stages=[("easy", "bce"), ("hard", "mnr")])
    spec = replace(spec, epochs_per_stage=1, lr=5e-3, lr_by_loss={"bce": 0.0})
    result = launch("inprocess", spec)
    easy, hard = result["stages"]
    assert easy["lr"] == 0.0 and hard["lr"] == 5e-3
    assert easy["best_epoch"] == 0 and easy["best_metric"] == pytest.approx(easy["start_metric"])
    assert hard["start_metric"] == pytest.approx(easy["best_metric"])  # stage 2 starts from stage 1's best
    assert hard["best_metric"] >= hard["start_metric"]
    out = Path(spec.output_dir)
    start = TwoTower.tiny()  # the same seeded random BERT the run started from
    kept = TwoTower.load(out / "stage1_easy" / "best")
    for a, b in zip(start.parameters(), kept.parameters()):
        assert torch.equal(a, b)


def test_starting_weights_scored_on_a_dev_set_are_not_evaluated_again(tmp_path, monkeypatch, caplog):
    """A second variant from the same base reads its start score from <dev dir>/start_scores.json; another dev set,
    or a damaged file, evaluates again."""
    spec = make_shards(tmp_path, n=16, stages=[("hard", "mnr")])
    spec = replace(spec, epochs_per_stage=1, max_steps_per_epoch=1)
    calls = []
    evaluate = DevSet.evaluate
    monkeypatch.setattr(DevSet, "evaluate", lambda self, model, *a, **kw: calls.append(1) or evaluate(self, model, *a, **kw))

    def start_metric(out: str) -> float:
        return launch("inprocess", replace(spec, output_dir=str(tmp_path / out)))["stages"][0]["start_metric"]

    first = start_metric("a")
    assert len(calls) == 2  # the starting weights, then the epoch
    assert start_metric("b") == first and len(calls) == 3  # the epoch only
    scores = tmp_path / "start_scores.json"
    assert list(json.loads(scores.read_text()).values()) == [first]
    scores.write_text("{not json")
    with caplog.at_level("WARNING", logger="training.runner"):
        assert start_metric("c") == first and len(calls) == 5
    assert "ignoring unreadable" in caplog.text
    pd.DataFrame({"query_id": ["q1", "q2"], "query": ["red shoe 1", "red shoe 2"], "product_id": ["p1", "p2"],
                  "grade": [4, 1]}).to_parquet(tmp_path / "dev_eval.parquet")  # another dev set
    start_metric("d")
    assert len(calls) == 7 and len(json.loads(scores.read_text())) == 2
    shared = tmp_path / "cache"  # the warehouse's folder (`annomine train` sets it), for variants with their own dev copies
    launch("inprocess", replace(spec, output_dir=str(tmp_path / "e"), score_cache_dir=str(shared)))
    assert len(calls) == 9 and len(json.loads((shared / "start_scores.json").read_text())) == 1


def test_a_stage_of_the_manifest_with_its_own_lr_overrides_the_loss_lr(tmp_path):
    """The human stage's lr (the `lr` of a curriculum stage definition) reaches the trainer through the manifest entry."""
    spec = make_shards(tmp_path, n=16, stages=[("easy", "bce"), ("hard", "mnr")])
    manifest_path = Path(spec.shards_root) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"][1]["lr"] = 0.0
    manifest_path.write_text(json.dumps(manifest))
    spec = replace(spec, epochs_per_stage=1, lr=5e-3, lr_by_loss={"mnr": 1e-2})
    easy, hard = launch("inprocess", spec)["stages"]
    assert easy["lr"] == 5e-3 and hard["lr"] == 0.0
    assert hard["best_epoch"] == 0 and hard["best_metric"] == pytest.approx(hard["start_metric"])


def test_two_gloo_ranks_hold_identical_parameters_after_a_step(spark, tmp_path, callbacks_by_value):
    """TorchDistributor (local mode) runs the training function on 2 gloo processes."""
    spec = make_shards(tmp_path, n=24, stages=[("hard", "mnr")])
    spec = replace(spec, max_steps_per_epoch=1, epochs_per_stage=1, threads=1)
    initial = torch.cat([p.detach().reshape(-1) for p in TwoTower.tiny().parameters()])
    result = launch("torch_distributor", spec, num_proc=2, callbacks=[DumpParams()])
    assert result["world_size"] == 2
    out = Path(spec.output_dir)
    r0 = torch.load(out / "params_stage1_hard_epoch1_rank0.pt")
    r1 = torch.load(out / "params_stage1_hard_epoch1_rank1.pt")
    assert torch.equal(r0, r1)
    assert not torch.allclose(r0, initial), "a step should have changed the parameters"


def test_best_json_follows_best_variant_only(tmp_path):
    from jobs.train import TrainConfig, publish_pointer

    names = publish_pointer(tmp_path, {"variant": "human"}, TrainConfig(variant="human", best_variant="curriculum"))
    assert names == ["human.json"] and not (tmp_path / "best.json").exists()
    publish_pointer(tmp_path, {"variant": "curriculum"}, TrainConfig(variant="curriculum", best_variant="curriculum"))
    assert json.loads((tmp_path / "best.json").read_text())["variant"] == "curriculum"
    publish_pointer(tmp_path, {"variant": "mixed"}, TrainConfig(variant="mixed"))  # none set: the last trained
    assert json.loads((tmp_path / "best.json").read_text())["variant"] == "mixed"
    with pytest.raises(ValueError, match="best_variant: 'best' is not a variant name"):
        TrainConfig(best_variant="best").validate()
    with pytest.raises(ValueError, match=r"baselines\[1\]: 'a/b' is not a variant name"):
        TrainConfig(baselines=["human", "a/b"]).validate()


def test_curriculum_then_train_jobs_end_to_end_with_mlflow(ctx):
    import mlflow

    from annomine import curriculum as cur
    from jobs.curriculum import CurriculumConfig
    from jobs.curriculum import run as run_curriculum
    from jobs.train import TrainConfig
    from jobs.train import run as run_train
    from tests.test_curriculum import build_world

    build_world(ctx, n_queries=16)
    roar = cur.StageDef("roar", "roar", list(cur.CLASSES), list(cur.CLASSES), max_examples=2000, max_per_query=20)
    curriculum = CurriculumConfig(num_files=2, row_group_size=8, dev_pool_size=10)
    curriculum = replace(curriculum, stages=[*curriculum.stages, roar],
                         variants={"curriculum_roar": ["easy", "hard", "roar"], "human": ["human"]})
    run_curriculum(ctx, curriculum)
    cfg = TrainConfig(variant="curriculum_roar", base_model="tiny", batch_size=8, progress=False, log_checkpoints=False,
                      num_proc=1, interpolate_alphas=[0.5], baselines=["human", "mixed"])
    pointer = run_train(ctx, cfg)
    models = ctx.project.warehouse_path / "models"
    assert read_pointer(models / "best.json")["path"] == pointer["path"], "a baseline never becomes best.json"
    # the baseline is trained beside the variant, on its own shards; one the curriculum did not write is skipped
    human = read_pointer(models / "human.json")
    assert human["variant"] == "human" and [s["source"] for s in human["stages"]] == ["human"]
    assert not (models / "mixed.json").exists()
    assert json.loads((models / "curriculum_roar.json").read_text())["variant"] == "curriculum_roar"
    assert Path(pointer["path"]).name.startswith("model-") and Path(pointer["path"]).parent.name == "curriculum_roar"
    assert [s["loss"] for s in pointer["stages"]] == ["bce", "mnr", "roar"]
    assert {s["source"] for s in pointer["stages"]} == {"mined"}
    kept = sum(s["examples"] for s in pointer["stages"] if s["best_epoch"] != 0)
    assert pointer["training_pairs"] == {"mined": kept, "human": 0}
    mlflow.set_tracking_uri(ctx.project.tracking_uri)
    run = mlflow.get_run(pointer["mlflow_run_id"])
    assert run.data.params["train.losses.bce.init_temperature"] == "20.0"
    assert "dev_ndcg10" in run.data.metrics and "train_loss" in run.data.metrics
    chosen = pointer["interpolation"]  # the dev check's pick between the trained weights and half way back
    assert set(chosen["dev"]) == {"0.5", "1"} and run.data.metrics["interpolation_alpha"] == chosen["alpha"]
    assert run.data.metrics["final_dev_ndcg10"] == pytest.approx(chosen["dev_metric"])
    assert run.data.metrics["dev_ndcg10_alpha_0_5"] == pytest.approx(chosen["dev"]["0.5"])
    client = mlflow.tracking.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 3
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.info.artifact_uri.startswith(ctx.project.warehouse_path.as_uri()), "artifacts belong in the warehouse"
    encoder = mlflow.pyfunc.load_model(pointer["model_uri"])
    emb = encoder.predict(pd.DataFrame({"text": ["red shoe", "red shoe item"], "side": ["query", "item"]}))
    direct = TwoTower.load(pointer["path"])
    assert np.allclose(emb.to_numpy()[0], direct.encode_queries(["red shoe"])[0], atol=1e-5)
    assert np.allclose(emb.to_numpy()[1], direct.encode_items(["red shoe item"])[0], atol=1e-5)
    # a second run of the same spec resumes (nothing left to train) and reuses the MLflow run; the pointer
    # still counts every example the model was trained on
    again = run_train(ctx, cfg)
    assert again["mlflow_run_id"] == pointer["mlflow_run_id"] and again["examples_this_run"] == 0
    assert again["examples"] == pointer["examples"] == pointer["examples_this_run"] > 0
    # the new model folder replaced the old one, which no pointer references any more
    assert [p for p in (models / "curriculum_roar").iterdir() if p.is_dir() and p.name != "run"] == [Path(again["path"])]


def test_training_pairs_count_the_kept_stages_by_source():
    from jobs.train import training_pairs

    manifest = {"stages": [{"stage": 1, "source": "human"}, {"stage": 2, "source": "mined"}, {"stage": 3, "source": "mined"}]}
    stages = [{"stage": 1, "examples": 40, "best_epoch": 1}, {"stage": 2, "examples": 64, "best_epoch": 0},
              {"stage": 3, "examples": 32, "best_epoch": 1}]
    assert training_pairs(stages, manifest) == {"mined": 32, "human": 40}  # stage 2 was dropped by its dev check
    # a stage of both sources (curriculum_with_human) splits its examples by its rows' shares
    manifest["stages"][1].update(source="mined+human", source_rows={"mined": 48, "human": 16})
    stages[1]["best_epoch"] = 1
    assert training_pairs(stages, manifest) == {"mined": 32 + 48, "human": 40 + 16}


def test_horovod_launcher_is_optional(tmp_path, callbacks_by_value):
    try:
        import horovod  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="make horovod"):
            launch("horovod", TrainSpec(shards_root=str(tmp_path), output_dir=str(tmp_path), min_grade=1), num_proc=2)
        return
    spec = make_shards(tmp_path, n=16, stages=[("hard", "mnr")])
    spec = replace(spec, max_steps_per_epoch=1, epochs_per_stage=1, threads=1)
    launch("horovod", spec, num_proc=2, callbacks=[DumpParams()])
    out = Path(spec.output_dir)
    assert torch.equal(torch.load(out / "params_stage1_hard_epoch1_rank0.pt"), torch.load(out / "params_stage1_hard_epoch1_rank1.pt"))


def test_a_second_train_on_the_same_warehouse_is_refused_naming_the_holder(ctx):
    from annomine.locks import LockHeld, warehouse_lock
    from jobs import train

    with warehouse_lock(ctx.project, "train"):
        with pytest.raises(LockHeld, match=r"train is already running on warehouse .*: held by pid \d+"):
            train.run(ctx, train.TrainConfig(base_model="tiny", mlflow=False, num_proc=1))


def test_the_spec_round_trips_through_json_and_refuses_unknown_keys(tmp_path):
    from training.losses import MNRParams

    spec = replace(make_shards(tmp_path, n=16, stages=[("hard", "mnr")]), losses={"mnr": MNRParams(margin_delta=None)},
                   tracking=Tracking("sqlite:///x.db", "r1"), lr_by_loss={"mnr": 1e-4})
    back = TrainSpec.from_json(spec.to_json())
    assert back == spec and isinstance(back.losses["mnr"], MNRParams) and back.loss_params("bce").init_temperature == 20.0
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['fail_after_steps'\]"):
        TrainSpec.from_dict({**spec.to_dict(), "fail_after_steps": 3})
    with pytest.raises(ConfigError, match=r"spec.losses.mnr: unknown key\(s\) \['tau'\]"):
        TrainSpec.from_dict({**spec.to_dict(), "losses": {"mnr": {"tau": 0.1}}})
    with pytest.raises(ConfigError, match="required key 'output_dir'"):
        TrainSpec.from_dict({"shards_root": "x", "min_grade": 1})


def test_the_resume_fingerprint_ignores_only_the_volatile_fields(tmp_path):
    from jobs.train import fingerprint

    spec, manifest = make_shards(tmp_path, n=16, stages=[("hard", "mnr")]), {"stages": []}
    same = replace(spec, threads=1, resume=False, progress=True, log_every=7, checkpoint_every_batches=3,
                   tracking=Tracking("sqlite:///x.db", "r1"))
    assert fingerprint(same, manifest, 1) == fingerprint(spec, manifest, 1)
    for changed in (replace(spec, lr=1e-3), replace(spec, seed=4), replace(spec, losses={"mnr": REGISTRY["mnr"].Params(scale=5)})):
        assert fingerprint(changed, manifest, 1) != fingerprint(spec, manifest, 1)
    assert fingerprint(spec, manifest, 2) != fingerprint(spec, manifest, 1)


# ---- a loss defined here: one class and its registration, no other module touched ---------------------
@dataclass
class CosineMarginParams:
    margin: float = 0.5


class CosineMarginLoss(PointwiseLoss):
    """Pointwise: pull positives to cos 1, push negatives below `margin`."""

    name = "cosine_margin"
    Params = CosineMarginParams

    def forward(self, q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, y = (q * d).sum(-1), labels.float()
        return (y * (1 - cos) + (1 - y) * F.relu(cos - self.params.margin)).mean()

    def step_metrics(self) -> dict[str, float]:
        return {"cosine_margin": self.params.margin}


@pytest.fixture
def cosine_margin_loss():
    register(CosineMarginLoss)
    yield CosineMarginLoss
    REGISTRY.pop(CosineMarginLoss.name)


def test_a_loss_defined_in_a_test_trains_a_stage_through_the_runner(tmp_path, cosine_margin_loss):
    spec = make_shards(tmp_path, n=16, stages=[("toy", "cosine_margin")])
    spec = replace(spec, log_every=1, losses={"cosine_margin": CosineMarginParams(margin=0.2)})
    result = launch("inprocess", TrainSpec.from_json(spec.to_json()))  # its params cross as JSON too
    (stage,) = result["stages"]
    assert stage["loss"] == "cosine_margin" and stage["done"] and stage["examples"] == 2 * 16
    steps = json.loads((Path(spec.output_dir) / "history.json").read_text())["steps"]
    assert len(steps) == 4 and all(h["cosine_margin"] == 0.2 and np.isfinite(h["train_loss"]) for h in steps)
    assert TwoTower.load(result["final_dir"]).encode_queries(["red shoe"]).shape == (1, 32)


def test_the_registry_checks_a_loss_against_the_curriculum_row_formats(cosine_margin_loss):
    from training.losses import ListLoss, build_loss

    assert isinstance(build_loss("cosine_margin", {"margin": 0.1}), CosineMarginLoss)

    class WrongBCE(ListLoss):  # the curriculum writes pointwise rows for bce
        name, Params = "bce", CosineMarginParams

    with pytest.raises(TypeError, match="trains on 'list' rows but the curriculum .* writes 'pointwise' rows"):
        register(WrongBCE)

    class Again(CosineMarginLoss):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Again)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss("hinge")


def test_interpolation_is_linear_in_the_weights():
    start, trained = TwoTower.tiny(seed=0), TwoTower.tiny(seed=1)
    for alpha in (0.0, 0.3, 1.0):
        mixed = interpolate(start, trained, alpha)
        for (name, a), b, m in zip(start.query_encoder.named_parameters(), trained.query_encoder.parameters(),
                                   mixed.query_encoder.parameters()):
            assert torch.allclose(m, a + alpha * (b - a), atol=1e-6), name
    # the trained model itself is untouched, and its encoder cache is not shared with the mixture
    assert torch.equal(next(trained.query_encoder.parameters()), next(TwoTower.tiny(seed=1).query_encoder.parameters()))
    assert not np.allclose(interpolate(start, trained, 0.5).encode_queries(["red shoe"]), trained.encode_queries(["red shoe"]))


def test_the_dev_check_chooses_how_far_to_move_back_to_the_start(tmp_path):
    """interpolate_alphas: each fraction is scored on dev beside the trained model; the final model is the best,
    saved as it was scored, and the run's result records every score."""
    spec = replace(make_shards(tmp_path, n=16, stages=[("hard", "mnr")]), epochs_per_stage=1, lr=5e-3,
                   interpolate_alphas=[0.0, 0.5])
    result = launch("inprocess", spec)
    chosen = result["interpolation"]
    assert set(chosen["dev"]) == {"0", "0.5", "1"}
    assert chosen["dev"]["1"] == pytest.approx(result["stages"][-1]["best_metric"])
    assert chosen["dev_metric"] == max(chosen["dev"].values())
    assert chosen["dev"][f"{chosen['alpha']:g}"] == chosen["dev_metric"]
    final = TwoTower.load(result["final_dir"])
    assert DevSet(spec.dev_dir, 1).evaluate(final) == pytest.approx(chosen["dev_metric"])
    start, trained = TwoTower.tiny(), TwoTower.load(result["stages"][-1]["best_dir"])
    expected = trained if chosen["alpha"] == 1.0 else interpolate(start, trained, chosen["alpha"])
    for a, b in zip(expected.parameters(), final.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="not a fraction"):
        launch("inprocess", replace(spec, interpolate_alphas=[1.5], output_dir=str(tmp_path / "out2")))


def test_a_merge_adds_each_models_move_from_the_start_by_its_weight():
    from training.interpolation import merge

    start, a, b = TwoTower.tiny(seed=0), TwoTower.tiny(seed=1), TwoTower.tiny(seed=2)
    for weights in ((0.5, 0.5), (1.0, 1.0), (0.25, 0.0)):
        merged = merge(start, [a, b], list(weights))
        for (name, s), pa, pb, m in zip(start.query_encoder.named_parameters(), a.query_encoder.parameters(),
                                        b.query_encoder.parameters(), merged.query_encoder.parameters()):
            assert torch.allclose(m, s + weights[0] * (pa - s) + weights[1] * (pb - s), atol=1e-6), (weights, name)
    half = merge(start, [a, b], [0.5, 0.5])  # the uniform soup is the plain average of the two
    for pa, pb, m in zip(a.query_encoder.parameters(), b.query_encoder.parameters(), half.query_encoder.parameters()):
        assert torch.allclose(m, (pa + pb) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="one weight per model"):
        merge(start, [a, b], [1.0])
    with pytest.raises(ValueError, match="tower sharing"):
        merge(start, [a, TwoTower.tiny(shared=False)], [0.5, 0.5])
