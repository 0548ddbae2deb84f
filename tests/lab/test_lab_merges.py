"""The lab's merged variants and seed soups (lab/merging.py, lab/train_merges.py), on the product's trainer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from annomine.publish import read_pointer
from annomine.two_tower import TwoTower
from lab.train_merges import LabConfig
from tests.test_training import make_shards
from training.runner import DevSet


def test_merge_candidates_and_their_config_are_checked():
    from lab.merging import MergeSpec, candidate_weights, label, merged_pairs

    spec = MergeSpec(of=["curriculum", "human"], weights=[[0.5, 0.5], [1.0, 0.0], [1, 1]])
    # each model alone first (the first best wins, so a merge must beat both), then the vectors, no repeats
    assert candidate_weights(spec) == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 1.0)]
    assert label((0.5, 0.5), spec.of) == "0.5 curriculum + 0.5 human" and label((1.0, 0.0), spec.of) == "1 curriculum"
    pointers = [{"training_pairs": {"mined": 30, "human": 0}}, {"training_pairs": {"mined": 0, "human": 20}}]
    assert merged_pairs(pointers, (0.5, 0.5)) == {"mined": 30, "human": 20}
    assert merged_pairs(pointers, (1.0, 0.0)) == {"mined": 30, "human": 0}
    # the first best wins: a merge replaces the models alone only when it beats them, and ties go to the earlier
    from training.interpolation import merge
    from lab.merging import choose

    start, models = TwoTower.tiny(seed=0), [TwoTower.tiny(seed=1), TwoTower.tiny(seed=2)]
    scores = iter([0.5, 0.4, 0.7, 0.7])
    chosen = choose(models, spec.of, candidate_weights(spec), lambda model: next(scores), start=start)
    assert chosen["weights"] == (0.5, 0.5) and chosen["metric"] == 0.7
    assert chosen["dev"] == {"1 curriculum": 0.5, "1 human": 0.4, "0.5 curriculum + 0.5 human": 0.7,
                             "1 curriculum + 1 human": 0.7}
    for a, b in zip(merge(start, models, [0.5, 0.5]).parameters(), chosen["model"].parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"has 1 weights for 2 models"):
        MergeSpec(weights=[[1.0]]).validate()
    with pytest.raises(ValueError, match="negative"):
        MergeSpec(weights=[[1.0, -0.5]]).validate()
    with pytest.raises(ValueError, match="two or more different"):
        MergeSpec(of=["human", "human"], weights=[]).validate()
    LabConfig(merges={"soup": MergeSpec()}).validate()
    with pytest.raises(ValueError, match="neither a merge nor a soup"):
        LabConfig(merges={"soup": MergeSpec()}).check_name("other")
    with pytest.raises(ValueError, match="give the merge its own"):
        LabConfig(merges={"human": MergeSpec()}).validate()
    with pytest.raises(ValueError, match="give the merge its own"):
        LabConfig(merges={"best": MergeSpec()}).validate()


def test_a_merged_variant_is_chosen_on_dev_published_and_tracked(ctx):
    """`python -m lab.train_merges` with a merge's name: the constituents' saved models combined, every candidate scored on the
    fold's dev check, the best saved as the variant's model, its pointer and MLflow run written."""
    import mlflow

    from annomine.errors import MissingInputError
    from annomine.model_specs import resolve_specs
    from annomine.publish import PointerError
    from jobs.train import TrainConfig
    from lab.merging import MergeSpec
    from lab.train_merges import LabConfig, run
    from training.interpolation import merge

    models = ctx.project.outputs_path / "models"
    make_shards(ctx.project.outputs_path / "shards")  # its dev_eval / dev_pool files are the fold's dev check
    for seed, (variant, pairs) in enumerate([("curriculum", {"mined": 30, "human": 0}), ("human", {"mined": 0, "human": 20})], 1):
        folder = TwoTower.tiny(seed=seed).save(models / variant / "model")
        (models / f"{variant}.json").write_text(json.dumps({"path": str(folder), "variant": variant, "training_pairs": pairs}))
    spec = MergeSpec(of=["curriculum", "human"], weights=[[0.5, 0.5], [1.0, 1.0]])
    cfg = TrainConfig(base_model="tiny", best_variant="curriculum")
    with pytest.raises(MissingInputError, match="needs variant 'nope' trained in this fold"):
        run(ctx, cfg, LabConfig(merges={"soup": MergeSpec(of=["curriculum", "nope"], weights=[])}), "soup")
    (models / "broken.json").write_text("{not json")
    with pytest.raises(PointerError, match=r"broken.json: not a readable pointer"):
        run(ctx, cfg, LabConfig(merges={"soup": MergeSpec(of=["curriculum", "broken"], weights=[])}), "soup")
    (models / "broken.json").unlink()
    pointer = run(ctx, cfg, LabConfig(merges={"soup": spec}), "soup")
    record = pointer["merge"]
    assert list(record["dev"]) == ["1 curriculum", "1 human", "0.5 curriculum + 0.5 human", "1 curriculum + 1 human"]
    assert record["dev_metric"] == max(record["dev"].values())
    chosen = record["weights"]
    dev = DevSet(ctx.project.outputs_path / "shards", 1, cfg.dev_max_queries)
    final = TwoTower.load(pointer["path"])
    assert dev.evaluate(final) == pytest.approx(record["dev_metric"])
    constituents = [TwoTower.load(models / v / "model") for v in spec.of]
    expected = merge(TwoTower.tiny(seed=0), constituents, chosen)
    for a, b in zip(expected.parameters(), final.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    used = [v for v, w in zip(spec.of, chosen) if w]
    assert pointer["training_pairs"] == {"mined": 30 * ("curriculum" in used), "human": 20 * ("human" in used)}
    assert read_pointer(models / "soup.json")["path"] == pointer["path"]
    assert not (models / "best.json").exists(), "best.json follows train.best_variant only"
    assert "soup" in [s.label for s in resolve_specs("variants", ctx.project.warehouse)]
    mlflow.set_tracking_uri(ctx.project.tracking_uri)
    run = mlflow.get_run(pointer["mlflow_run_id"])
    assert run.data.metrics["final_dev_ndcg10"] == pytest.approx(record["dev_metric"])
    assert json.loads(run.data.params["train.merge.of"]) == ["curriculum", "human"]
    emb = mlflow.pyfunc.load_model(pointer["model_uri"]).predict(pd.DataFrame({"text": ["red shoe"], "side": ["query"]}))
    assert np.allclose(emb.to_numpy()[0], final.encode_queries(["red shoe"])[0], atol=1e-5)


def test_soup_config_names_its_members_and_is_checked():
    from lab.merging import MergeSpec, SoupSpec

    soup = SoupSpec(of="curriculum", seeds=[13, 14, 15])
    assert soup.members(13) == [("curriculum", 13), ("curriculum_seed14", 14), ("curriculum_seed15", 15)]
    assert soup.members(7)[0] == ("curriculum_seed13", 13), "only the configured train.seed's member is the variant"
    assert soup.candidates() == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1 / 3, 1 / 3, 1 / 3)]
    assert SoupSpec(seeds=[13, 14, 15], select="uniform").candidates() == [(1 / 3, 1 / 3, 1 / 3)]
    with pytest.raises(ValueError, match="two or more different training seeds"):
        SoupSpec(seeds=[13, 13]).validate()
    with pytest.raises(ValueError, match="select must be one of"):
        SoupSpec(select="best").validate()
    LabConfig(soups={"cs": soup}).validate()
    with pytest.raises(ValueError, match="give the soup its own"):
        LabConfig(soups={"curriculum": soup}).validate()
    with pytest.raises(ValueError, match="give the soup its own"):
        LabConfig(merges={"cs": MergeSpec()}, soups={"cs": soup}).validate()


def test_a_seed_soup_trains_its_missing_members_and_keeps_the_average_only_when_dev_says_so(ctx):
    """`python -m lab.train_merges` with a soup's name: the member of the configured seed (trained before) is reused, the other
    seed is trained and published as a variant of its own, then each alone and the average compete on dev."""
    from jobs.train import TrainConfig
    from jobs.train import run as run_train
    from lab.merging import SoupSpec
    from lab.train_merges import LabConfig, run
    from training.interpolation import merge

    shards, models = ctx.project.outputs_path / "shards", ctx.project.outputs_path / "models"
    make_shards(shards, stages=[("hard", "mnr")], variant="curriculum")
    cfg = TrainConfig(variant="curriculum", base_model="tiny", batch_size=8, progress=False, log_checkpoints=False,
                      num_proc=1, seed=13, best_variant="curriculum", keep_start_if_better=False, baselines=[])
    first = run_train(ctx, cfg)
    assert first["seed"] == 13 and first["trained"] == "curriculum"
    pointer = run(ctx, cfg, LabConfig(soups={"cs": SoupSpec(seeds=[13, 14])}), "cs")
    assert json.loads((models / "curriculum.json").read_text())["mlflow_run_id"] == first["mlflow_run_id"], "reused"
    member = json.loads((models / "curriculum_seed14.json").read_text())
    assert member["seed"] == 14 and member["trained"] == "curriculum" and member["variant"] == "curriculum_seed14"
    assert (models / member["path"]).parent == models / "curriculum_seed14"  # relative to the pointer's folder
    member = read_pointer(models / "curriculum_seed14.json")
    a, b = TwoTower.load(first["path"]), TwoTower.load(member["path"])
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())), "another seed, another model"
    record = pointer["merge"]
    assert list(record["dev"]) == ["1 curriculum", "1 curriculum_seed14", "0.5 curriculum + 0.5 curriculum_seed14"]
    assert record["dev_metric"] == max(record["dev"].values())
    expected = merge(TwoTower.tiny(seed=0), [a, b], record["weights"])
    for x, y in zip(expected.parameters(), TwoTower.load(pointer["path"]).parameters()):
        assert torch.allclose(x, y, atol=1e-6)
    assert pointer["training_pairs"]["mined"] == max(first["training_pairs"]["mined"], member["training_pairs"]["mined"])
    assert json.loads((models / "best.json").read_text())["variant"] == "curriculum", "best.json follows best_variant"
    # select: uniform reuses both members and publishes their average without letting dev choose
    uniform = run(ctx, cfg, LabConfig(soups={"cu": SoupSpec(seeds=[13, 14], select="uniform")}), "cu")
    assert list(uniform["merge"]["dev"]) == ["0.5 curriculum + 0.5 curriculum_seed14"]
    assert uniform["merge"]["weights"] == [0.5, 0.5]
    assert json.loads((models / "curriculum_seed14.json").read_text())["mlflow_run_id"] == member["mlflow_run_id"], "reused"
