"""Atomic publishing (annomine.publish): shard sets, models and judges are written to a new folder and published by
one pointer switch, so a run killed at any write leaves the complete old set or the complete new one; pointers hold
paths relative to themselves; what killed runs leave is removed by the next run of their stage."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from annomine import publish
from annomine.cli import guarded
from annomine.publish import PointerError, read_pointer, reading, run_folder, write_pointer
from tests.test_shards import rows
from training.shards import (ShardSetError, check_shards, published_shards, write_manifest,
                             write_stage_shards)

ROOT = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """What the kill hook raises in-process: like kill -9, no `except Exception` of the job catches it."""


def kill_at(monkeypatch, n: int) -> None:
    """End the next publishing run at its n-th file write."""
    def die(code):
        raise Killed(code)

    monkeypatch.setattr(publish, "_writes", 0)
    monkeypatch.setenv(publish.KILL_ENV, str(n))
    monkeypatch.setattr(publish, "_exit_now", die)


def kill_points(monkeypatch, run_once, check) -> int:
    """`run_once()` killed at its 1st, 2nd, ... write, `check()` after each, until a run completes; the kill points."""
    for n in itertools.count(1):
        kill_at(monkeypatch, n)
        try:
            run_once()
        except Killed:
            check()
            continue
        monkeypatch.delenv(publish.KILL_ENV)
        return n - 1


# ---- shard sets: curriculum writes, train reads ----------------------------------------------------------
def variant_rows(generation: str, n: int = 10) -> pd.DataFrame:
    """Training rows of two stages whose product ids name their generation ('old' or 'new')."""
    parts = []
    for k, name in ((1, "easy"), (2, "hard")):
        df = rows(n + k).assign(stage=k, stage_name=name, loss="bce")
        df["product_id"] = [f"{generation}-{k}-{p}" for p in df["product_id"]]
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def publish_generation(root: Path, generation: str) -> dict:
    from jobs.curriculum import CurriculumConfig, publish_variant

    cfg = CurriculumConfig(num_files=2, row_group_size=4)
    dev = (pd.DataFrame({"query_id": ["q1"], "query": [generation], "product_id": ["p1"], "grade": [3]}),
           pd.DataFrame({"product_id": ["p1"], "text": [generation]}))
    return publish_variant(root, cfg.stages[:2], variant_rows(generation), [1, 2], cfg, {"variant": "v"}, dev)


def what_train_reads(variant_root: Path) -> tuple[str, list[tuple[int, str]]]:
    """The set train would train on (what jobs.train reads and checks): its generation and its (stage, product) rows."""
    folder = published_shards(variant_root)
    manifest = check_shards(folder)
    got = sorted((e["stage"], p) for e in manifest["stages"]
                 for f in sorted((folder / e["folder"]).glob("part-*.parquet"))
                 for p in pq.read_table(f, columns=["product_id"]).column("product_id").to_pylist())
    dev = pd.read_parquet(folder / "dev_eval.parquet")["query"].tolist()
    return dev[0], got


def expected_rows(generation: str) -> list[tuple[int, str]]:
    df = variant_rows(generation)
    return sorted(zip(df["stage"].astype(int), df["product_id"]))


def test_a_curriculum_killed_at_any_write_leaves_train_the_old_set_or_the_new_one(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    publish_generation(root, "old")
    seen = []

    def check():
        generation, got = what_train_reads(root / "v")
        assert got == expected_rows(generation), f"a mixed or partial set is published ({generation})"
        seen.append(generation)

    points = kill_points(monkeypatch, lambda: publish_generation(root, "new"), check)
    assert points == 2 * 2 + 2 + 2  # 2 stages x 2 files, the dev check's 2 files, the set's and the published manifest
    assert seen == ["old"] * (points - 1) + ["new"], "the switch is the last write"
    assert what_train_reads(root / "v") == ("new", expected_rows("new"))
    # the completed run removed the folders of the killed ones and the superseded set
    published = published_shards(root / "v")
    assert [p for p in (root / "v").iterdir() if p.is_dir()] == [published]


def test_train_refuses_a_set_whose_files_do_not_match_its_manifest(tmp_path, project):
    """What an in-place rewrite killed midway leaves (the older layout): a 0-byte part file, fewer rows than listed.
    `annomine train` stops naming the file before any training."""
    from jobs import train

    variant_root = project.outputs_path / "shards" / "curriculum"
    entries = []
    for k, name in ((1, "easy"), (2, "hard")):
        entry = write_stage_shards(rows(12), variant_root / f"stage{k}_{name}", num_files=2, row_group_size=4)
        entries.append(dict(entry, stage=k, name=name, loss="bce", folder=f"stage{k}_{name}"))
    write_manifest(variant_root, {"variant": "curriculum", "stages": entries})
    assert check_shards(published_shards(variant_root))["stages"][1]["rows"] == 12
    empty = variant_root / "stage2_hard" / "part-00001.parquet"
    empty.write_bytes(b"")
    cfg = train.TrainConfig(base_model="tiny", mlflow=False, num_proc=1)
    with pytest.raises(ShardSetError, match=rf"{empty}: not a readable Parquet shard"):
        train.run(SimpleNamespace(project=project), cfg)
    write_stage_shards(rows(5), variant_root / "stage2_hard", num_files=2, row_group_size=4)  # another run's rows
    with pytest.raises(ShardSetError, match=r"part-00000.parquet: 2 rows, its manifest .* lists 6"):
        train.run(SimpleNamespace(project=project), cfg)
    assert not (project.outputs_path / "models" / "curriculum").exists(), "nothing trained"


def test_a_set_being_read_is_kept_until_its_reader_lets_go(tmp_path):
    root = tmp_path / "shards"
    publish_generation(root, "old")
    old = published_shards(root / "v")
    with reading(old):  # a train over the old set
        publish_generation(root, "new")
        assert old.is_dir() and published_shards(root / "v") != old
    publish_generation(root, "newer")
    assert not old.exists()


def test_the_kill_hook_ends_the_process_at_once(tmp_path):
    """ANNOMINE_TEST_KILL_AT_WRITE ends a real process like kill -9: nothing after the write runs, the old set stays."""
    root = tmp_path / "shards"
    publish_generation(root, "old")
    script = ("import sys; from pathlib import Path; from tests.test_publish import publish_generation; "
              "publish_generation(Path(sys.argv[1]), 'new'); print('finished')")
    env = dict(os.environ, **{publish.KILL_ENV: "3"}, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script, str(root)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == publish.KILLED_EXIT and "finished" not in done.stdout, done.stderr[-2000:]
    assert what_train_reads(root / "v") == ("old", expected_rows("old"))
    assert len([p for p in (root / "v").iterdir() if p.is_dir()]) == 2, "the killed run's folder is left ..."
    publish_generation(root, "new")
    assert [p for p in (root / "v").iterdir() if p.is_dir()] == [published_shards(root / "v")], "... until the next run"


# ---- models: train writes, evaluate reads ----------------------------------------------------------------
def publish_model(project, generation: str) -> dict:
    """jobs.train's publishing of a finished run (a model folder of two files), without MLflow."""
    from jobs.train import TrainConfig, _publish

    final = project.warehouse_path / "finished" / generation
    (final / "encoder").mkdir(parents=True, exist_ok=True)
    (final / "config.json").write_text(json.dumps({"generation": generation}))
    (final / "encoder" / "weights.bin").write_bytes(generation.encode() * 100)
    result = {"final_dir": str(final), "examples": 10, "examples_this_run": 10, "train_seconds": 1.0,
              "examples_per_s": 10.0, "stages": [], "interpolation": None}
    run = {"run_id": None, "run_dir": None, "launcher": "inprocess", "wall": 1.0, "manifest": {"stages": []}}
    return _publish(SimpleNamespace(project=project), TrainConfig(variant="curriculum", mlflow=False), result, run, "curriculum")


def model_generation(folder: Path) -> str:
    generation = json.loads((folder / "config.json").read_text())["generation"]
    assert (folder / "encoder" / "weights.bin").read_bytes() == generation.encode() * 100, "a partial model"
    return generation


def test_a_train_killed_at_any_write_leaves_every_pointer_on_a_complete_model(project, monkeypatch):
    from jobs.train import prune_models

    models = project.outputs_path / "models"
    publish_model(project, "old")
    seen = []

    def check():
        got = {name: model_generation(Path(read_pointer(models / name)["path"])) for name in ("curriculum.json", "best.json")}
        seen.append(got)

    points = kill_points(monkeypatch, lambda: publish_model(project, "new"), check)
    assert points == 2 + 2  # the model's two files, then curriculum.json and best.json
    old, new = {"curriculum.json": "old", "best.json": "old"}, {"curriculum.json": "new", "best.json": "new"}
    assert seen == [old, old, {"curriculum.json": "new", "best.json": "old"}, new], "each pointer switches whole"
    prune_models(models)  # what the next train does first
    referenced = {Path(read_pointer(models / name)["path"]) for name in ("curriculum.json", "best.json")}
    assert {p for p in (models / "curriculum").iterdir() if p.is_dir()} == referenced


def test_pointers_in_a_copied_warehouse_point_into_the_copy(project, tmp_path):
    """models/best.json and judges/current.json store paths relative to themselves: `evaluate` in a copy evaluates
    the copy's model, and the cascade there loads the copy's judge."""
    from annomine.model_specs import resolve_specs
    from annomine.judges.store import judges_root, resolve_judge, set_current

    publish_model(project, "new")
    judge = judges_root(project.warehouse) / "ce-1.20261206T000000-abcdef"
    judge.mkdir(parents=True)
    set_current(project.warehouse, "ce-1", judge)
    copy = tmp_path / "copy"
    shutil.copytree(project.warehouse_path, copy)
    best = resolve_specs("best", copy, registry=copy / "models")[0]
    assert Path(best.path).is_relative_to(copy) and model_generation(Path(best.path)) == "new"
    assert resolve_judge(copy, None) == copy / "judges" / judge.name
    assert resolve_judge(copy, "ce-1") == copy / "judges" / judge.name  # its version names the current folder
    assert json.loads((copy / "models" / "best.json").read_text())["path"].startswith("curriculum/model-")


def test_a_pointer_of_an_older_version_with_an_absolute_path_is_read_while_that_path_exists(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    pointer = tmp_path / "models" / "best.json"
    pointer.parent.mkdir()
    pointer.write_text(json.dumps({"path": str(folder), "variant": "x"}))
    assert read_pointer(pointer)["path"] == str(folder)
    folder.rmdir()
    with pytest.raises(PointerError, match=rf"{pointer}: 'path' is the absolute path {folder}, which does not exist"):
        read_pointer(pointer)


@pytest.mark.parametrize("text", ['{"version": "ce-1", "pa', "[1, 2]"])
def test_a_broken_pointer_is_one_line_naming_the_file(project, capsys, text):
    """A truncated or wrong-shaped judges/current.json or models/best.json: exit 2 and one line naming it."""
    from annomine.model_specs import resolve_specs
    from annomine.judges.store import judges_root, resolve_judge

    wh = project.warehouse_path
    for file, read in ((judges_root(wh) / "current.json", lambda argv: resolve_judge(wh, None)),
                       (wh / "models" / "best.json", lambda argv: resolve_specs("best", wh))):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
        assert guarded("annomine evaluate", read, []) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"annomine evaluate: error: {file}: not a") and "Traceback" not in "".join(err)


# ---- helpers: scratch folders, live runs -----------------------------------------------------------------
def test_mine_removes_the_scratch_folders_of_killed_runs_and_keeps_a_live_one(project):
    from jobs.mine import scratch_folder

    scratch = project.warehouse_path / "_scratch"
    older = scratch / "mine-1a2b3c4d"  # a killed run of an older version (no lock file)
    (older / "candidates").mkdir(parents=True)
    with pytest.raises(Killed), run_folder(scratch, "mine-") as killed:
        (killed / "part-0.parquet").write_bytes(b"x")
        raise Killed  # kill -9: the folder stays, the operating system drops the lock
    ctx = SimpleNamespace(project=project, tables=SimpleNamespace(unity_catalog=False))
    with run_folder(scratch, "mine-") as live:  # a concurrent mine, still running
        with scratch_folder(ctx) as mine:
            assert mine.is_dir() and live.is_dir()
            assert not older.exists() and not killed.exists()
        assert not mine.exists()
    assert [p for p in scratch.iterdir() if p.is_dir()] == [live]
    with scratch_folder(ctx):
        pass
    assert not list(scratch.iterdir()), "no folder or lock file left"


def test_write_pointer_stores_paths_relative_to_the_pointer(tmp_path):
    target = tmp_path / "judges" / "ce-1.x"
    target.mkdir(parents=True)
    file = write_pointer(tmp_path / "judges" / "current.json", {"version": "ce-1", "path": str(target)})
    assert json.loads(file.read_text()) == {"version": "ce-1", "path": "ce-1.x"}
    assert read_pointer(file) == {"version": "ce-1", "path": str(target.resolve())}
    assert [p.name for p in file.parent.iterdir() if p.name.endswith(".tmp")] == []
