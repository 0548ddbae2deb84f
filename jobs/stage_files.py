"""The files each pipeline stage reads and writes, for its fingerprint (`annomine.pipeline_state`).

Each function takes (project, the stage's typed config) and returns paths. The pipeline hashes the
content of the files a stage reads, so a new judge, new shards or a new model pointer makes every
stage that reads them run again, whichever folder the artefacts behind them were published to.
"""

from __future__ import annotations

import re
from pathlib import Path

from annomine.evaluation.metrics import HYBRID_SUFFIX
from training.shards import MANIFEST

# The files under a model folder that say what the model is (annomine/model_specs.py).
MODEL_FOLDER_MARKERS = ("twotower.json", "config.json")
_REGISTRY_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_LABELLED = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")


def ingest_sources(project, cfg) -> list[Path]:
    """The source files ingest loads."""
    return [Path(src.path) for src in (cfg.products, cfg.queries, cfg.labels, cfg.retrieval_logs) if src is not None]


def judge_pointer(project, cfg=None) -> list[Path]:
    """The current judge's pointer: `judge` writes it, annotate and evaluate read it."""
    return [project.warehouse_path / "judges" / "current.json"]


def shards_root(project, cfg) -> Path:
    """Where curriculum writes and train reads the shards (`shards_dir`, default <outputs>/shards)."""
    return Path(cfg.shards_dir).expanduser().resolve() if cfg.shards_dir else project.outputs_path / "shards"


def curriculum_outputs(project, cfg) -> list[Path]:
    """The shard manifest of every variant curriculum writes."""
    root = shards_root(project, cfg)
    return [root / variant / MANIFEST for variant in cfg.variants]


def _models(project) -> Path:
    return project.outputs_path / "models"


def _baselines(project, cfg) -> list[str]:
    """The baselines train trains: those the curriculum published a training set for, other than the variant."""
    root = shards_root(project, cfg)
    return [b for b in cfg.baselines if b != cfg.variant and (root / b / MANIFEST).is_file()]


def train_inputs(project, cfg) -> list[Path]:
    """The shard manifests of the variant and the baselines train trains, and the dev evaluation set that selects
    their epochs."""
    root = shards_root(project, cfg)
    files = [root / "dev_eval.parquet", root / "dev_pool.parquet"]
    return files + [root / variant / MANIFEST for variant in [cfg.variant, *_baselines(project, cfg)]]


def train_outputs(project, cfg) -> list[Path]:
    return [_models(project) / f"{variant}.json" for variant in [cfg.variant, *_baselines(project, cfg)]]


def _model_files(project, spec: str) -> list[Path]:
    """The pointer or marker files behind one evaluate model spec (none for bm25, minilm, MLflow URIs)."""
    labelled = _LABELLED.match(spec)
    if labelled and "://" not in labelled.group(1):
        spec = labelled.group(2)
    if spec.endswith(HYBRID_SUFFIX) and spec != HYBRID_SUFFIX and not Path(spec).expanduser().is_dir():
        spec = spec[:-len(HYBRID_SUFFIX)]
    registry = _models(project)
    if spec == "variants":
        return sorted(f for f in registry.glob("*.json") if f.name != "best.json")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return [folder / marker for marker in MODEL_FOLDER_MARKERS]
    if _REGISTRY_NAME.fullmatch(spec) and (registry / f"{spec}.json").is_file():
        return [registry / f"{spec}.json"]
    return []


def ranker_pointer(project, cfg=None) -> list[Path]:
    """The current ranker's pointer: `rank` writes it, evaluate reads it (the `ranked` lists)."""
    return [project.outputs_path / "rankers" / "current.json"]


def rank_inputs(project, cfg) -> list[Path]:
    """The judge whose grades and tier-1 scores the ranker learns from, and the retriever it reranks."""
    return [*judge_pointer(project), _models(project) / "best.json"]


def rank_outputs(project, cfg) -> list[Path]:
    return ranker_pointer(project)


def evaluate_inputs(project, cfg) -> list[Path]:
    """The model pointers of `evaluate.models`, the judge and ranker pointers and any input files;
    `best.json` always, as the closing summary names it."""
    files = [_models(project) / "best.json", *judge_pointer(project), *ranker_pointer(project)]
    files += [Path(p) for p in (cfg.products, cfg.queries, cfg.labels) if p]
    for spec in cfg.models:
        files += _model_files(project, spec.strip())
    return list(dict.fromkeys(files))
