"""What every rank of a training run receives: `TrainSpec`, typed, JSON-able, built once by `annomine train`.

`TrainSettings` are the knobs of training, each with its one default: `jobs/train.py: TrainConfig` is a
`TrainSettings` plus the job's own keys (variant, launcher, num_proc, MLflow switches, ...), so the YAML
section `train` sets them and nothing restates them. `TrainSpec` adds where the run reads and writes,
the project's grade scale, each loss's params (the `Params` dataclass instances of `training.losses`,
shared with `train.losses`, not copied) and the MLflow run to log to.

It crosses process boundaries unchanged: pickled by TorchDistributor and Horovod, a JSON file for
torchrun (`to_json` = `dataclasses.asdict`; `from_json` / `from_dict` rebuild it and refuse unknown keys).
Fields marked `volatile` may differ between an interrupted run and its resume (`resume_key()`: the rest,
which `jobs/train.py: fingerprint` hashes).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from annomine.bounds import bounded
from annomine.config import from_dict as _typed
from training.losses import loss_class

VOLATILE = {"volatile": True}  # field metadata: does not change what a run trains (see `resume_key`)


@dataclass
class TrainSettings:
    # 'minilm' (bundled all-MiniLM-L6-v2), a local HF folder, or 'tiny[:HxL]' (random BERT; tests)
    base_model: str = "minilm"
    shared: bool = True
    query_max_len: int = bounded(16, ge=1)
    item_max_len: int = bounded(64, ge=1)
    batch_size: int = bounded(64, ge=1)  # per rank
    lr: float = bounded(2e-5, gt=0)
    loss_lr: float = bounded(1e-2, gt=0)  # learnable loss parameters (BCE temperature and bias)
    lr_by_loss: dict[str, float] = bounded({}, gt=0)  # per-loss learning rate, e.g. {bce: 1.0e-5}
    keep_start_if_better: bool = True  # a stage whose epochs all score below its starting weights on dev is dropped
    # WiSE-FT (training.interpolation): after the last stage, these fractions of the way from the starting weights
    # to the trained ones compete with the trained model on the dev check; the best is the final model ([]: off)
    interpolate_alphas: list[float] = field(default_factory=list)
    weight_decay: float = bounded(0.01, ge=0)
    warmup_ratio: float = bounded(0.1, ge=0, lt=1)
    max_grad_norm: float = bounded(1.0, gt=0)
    epochs_per_stage: int = bounded(1, ge=1)
    max_steps_per_epoch: int | None = bounded(None, ge=1)
    threads: int | None = bounded(None, ge=1, metadata=VOLATILE)  # torch threads per rank (None: torch's default)
    bf16: bool = True  # autocast on GPU
    resume: bool = field(default=True, metadata=VOLATILE)
    # a resumable checkpoint every N batches too (0: at epoch ends only); a resumed run reproduces an
    # uninterrupted one whatever its checkpoint interval
    checkpoint_every_batches: int = bounded(200, ge=0, metadata=VOLATILE)
    dev_max_queries: int | None = bounded(None, ge=1)
    shuffle_buffer: int = bounded(2048, ge=1)
    log_every: int = bounded(10, ge=1, metadata=VOLATILE)
    progress: bool = field(default=True, metadata=VOLATILE)
    seed: int = 13

    def lr_for(self, loss: str) -> float:
        return self.lr_by_loss.get(loss, self.lr)


@dataclass
class Tracking:
    """The MLflow run rank 0 logs metrics to."""

    tracking_uri: str
    run_id: str


@dataclass(kw_only=True)
class TrainSpec(TrainSettings):
    shards_root: str  # a shard set: manifest.json and the stage folders (train: the variant's published run folder)
    output_dir: str  # checkpoints, progress.json, history.json, result.json, final/
    min_grade: int  # the project's lowest grade (dev gains are grade - min_grade)
    dev_dir: str | None = None  # holds dev_eval.parquet and dev_pool.parquet (None or absent: no dev evaluation)
    init_from: str | None = None  # TwoTower folder the first stage starts from (None: base_model)
    losses: dict[str, Any] = field(default_factory=dict)  # loss name -> its Params (absent: the defaults)
    tracking: Tracking | None = field(default=None, metadata=VOLATILE)
    # where the dev scores of starting weights are kept for every training that shares it (start_scores.json;
    # None: the dev set's folder)
    score_cache_dir: str | None = field(default=None, metadata=VOLATILE)

    @classmethod
    def of(cls, settings: TrainSettings, **placement) -> TrainSpec:
        """The spec of `settings` (a `TrainSettings`, or a config that extends it) placed by `placement`."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(TrainSettings)}, **placement)

    def loss_params(self, name: str):
        """The params of loss `name`: as configured, else its defaults."""
        params = self.losses.get(name)
        return params if params is not None else loss_class(name).Params()

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict, where: str = "spec") -> TrainSpec:
        """Rebuild a spec from `to_dict()`; an unknown key (the spec's or a loss's) is an error naming it."""
        data = dict(data)
        losses = data.pop("losses", None) or {}
        spec = _typed(cls, data, where)
        spec.losses = {name: _typed(loss_class(name).Params, params, f"{where}.losses.{name}")
                       for name, params in losses.items()}
        return spec

    @classmethod
    def from_json(cls, text: str, where: str = "spec") -> TrainSpec:
        return cls.from_dict(json.loads(text), where)

    def resume_key(self) -> dict:
        """The spec without its volatile fields: what a resumed run must share with the interrupted one."""
        volatile = {f.name for f in dataclasses.fields(self) if f.metadata.get("volatile")}
        return {k: v for k, v in self.to_dict().items() if k not in volatile}
