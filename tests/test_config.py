import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from annomine.config import ConfigError, load_job_config, load_project_config


@dataclass
class Inner:
    k: int = 5


@dataclass
class DemoJob:
    threshold: float = 0.5
    name: str = "x"
    flags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None

    def validate(self):
        if not 0 <= self.threshold <= 1:
            raise ValueError("threshold must be within 0..1")


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_typed_sections_with_env_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("WH", "/tmp/wh-x")
    p = _write(tmp_path, "project: {warehouse: '${WH}', schema: '${NOPE:-dflt}'}\njob: {threshold: 0.25, inner: {k: 7}}\n")
    project, job = load_job_config(p, "job", DemoJob, ["job.name=hello", "job.maybe=3"])
    assert project.warehouse == "/tmp/wh-x" and project.schema == "dflt"
    assert job.threshold == 0.25 and job.inner.k == 7 and job.name == "hello" and job.maybe == 3


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    p = _write(tmp_path, "job: {treshold: 0.3}\n")
    with pytest.raises(ConfigError) as err:
        load_job_config(p, "job", DemoJob)
    assert str(p) in str(err.value) and "treshold" in str(err.value) and "job" in str(err.value)


def test_wrong_type_and_failed_validation_are_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.inner\.k: expected an integer"):
        load_job_config(_write(tmp_path, "job: {inner: {k: many}}\n"), "job", DemoJob)
    with pytest.raises(ConfigError, match="threshold must be within"):
        load_job_config(_write(tmp_path, "job: {threshold: 3}\n"), "job", DemoJob)


def test_missing_env_without_default_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="ANNOMINE_SURELY_UNSET"):
        load_project_config(_write(tmp_path, "project: {warehouse: '${ANNOMINE_SURELY_UNSET}'}\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_project_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["local", "crowdflower", "databricks"])
def test_shipped_configs_load(name, monkeypatch):
    from pathlib import Path

    from annomine.stages import BY_NAME

    root = Path(__file__).resolve().parents[1]
    project = load_project_config(root / "conf" / f"{name}.yaml")
    assert project.schema
    import importlib

    import yaml

    doc = yaml.safe_load((root / "conf" / f"{name}.yaml").read_text())
    for section in doc:
        if section == "project":
            continue
        module = importlib.import_module(BY_NAME[section].module)  # an unknown section fails here
        if module is not None and hasattr(module, "CONFIG_CLASS"):
            load_job_config(root / "conf" / f"{name}.yaml", section, module.CONFIG_CLASS)


def test_a_fold_keeps_its_outputs_apart_and_the_pipeline_runs_fold_0_only(tmp_path):
    from jobs import pipeline

    p = _write(tmp_path, f"project: {{warehouse: '{tmp_path / 'wh'}'}}\n")
    zero, one = load_project_config(p), load_project_config(p, ["project.fold=1"])
    assert zero.outputs_path == zero.warehouse_path == one.warehouse_path  # tables, caches, judges: shared
    assert one.outputs_path == one.warehouse_path / "folds" / "fold1"
    with pytest.raises(ConfigError, match="fold must be one of"):
        load_project_config(p, ["project.fold=2"])
    with pytest.raises(ConfigError, match="the pipeline runs fold 0; run another fold stage by stage"):
        pipeline.run_pipeline(str(p), ["project.fold=1"])
    assert not (tmp_path / "wh").exists()  # refused before anything ran


def test_a_rotation_lives_in_a_warehouse_of_its_own(tmp_path):
    p = _write(tmp_path, f"project: {{warehouse: '{tmp_path / 'wh'}'}}\n")
    zero, two = load_project_config(p), load_project_config(p, ["project.rotation=2", "project.fold=1"])
    assert zero.warehouse_path == zero.base_warehouse_path == (tmp_path / "wh").resolve()
    assert two.base_warehouse_path == zero.warehouse_path
    assert two.warehouse_path == zero.warehouse_path / "rotations" / "rotation2"  # tables, judges, MLflow: its own
    assert two.outputs_path == two.warehouse_path / "folds" / "fold1"
    assert two.tracking_uri == f"sqlite:///{two.warehouse_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="rotation must be one of"):
        load_project_config(p, ["project.rotation=7"])
    # on a catalog the tables are the catalog's, so another rotation needs a schema of its own
    with pytest.raises(ConfigError, match="set project.schema to a schema of its own"):
        load_project_config(p, ["project.rotation=1", "project.catalog=main"])
    assert load_project_config(p, ["project.rotation=1", "project.catalog=main",
                                   "project.schema=annomine_rotation1"]).schema == "annomine_rotation1"


@pytest.mark.parametrize("name", ["local", "crowdflower", "databricks"])
def test_shipped_configs_train_the_curriculum_and_the_human_baseline(name):
    """The product's question: did the pipeline's model beat fine-tuning on the labels (`human`), BM25, zero-shot
    MiniLM and their fusion? The shipped configs build those two variants only and evaluate against the rest, beside
    the reranked lists (the cross-encoder's rerank and the rank stage's) without the rank stage's ablations."""
    from pathlib import Path

    from jobs.curriculum import CurriculumConfig
    from jobs.evaluate import EvaluateConfig
    from jobs.train import TrainConfig

    conf = Path(__file__).resolve().parents[1] / "conf" / f"{name}.yaml"
    _, curriculum = load_job_config(conf, "curriculum", CurriculumConfig)
    _, train = load_job_config(conf, "train", TrainConfig)
    _, evaluate = load_job_config(conf, "evaluate", EvaluateConfig)
    assert list(curriculum.variants) == ["curriculum", "human"]
    assert [s.name for s in curriculum.variant_stages("human")] == ["human"]
    assert train.variant == "curriculum" and train.baselines == ["human"]
    assert evaluate.models == ["bm25", "minilm", "minilm+bm25", "variants", "best+ce", "ranked"]
    from jobs.rank import RankConfig

    _, rank = load_job_config(conf, "rank", RankConfig)
    assert rank.ablations is False


def test_importing_annomine_sets_short_openmp_spins_unless_the_environment_sets_a_wait_policy():
    def waits(**extra) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | extra
        code = "import os, annomine; print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'))"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert waits() == "PASSIVE 3000"
    assert waits(GOMP_SPINCOUNT="0") == "PASSIVE 0"          # a spin count of the environment's own
    assert waits(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE None"  # its own policy: no spin count is added
