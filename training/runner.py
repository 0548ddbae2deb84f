"""The stage runner: trains the curriculum's stages in order on one rank of a process group.

Each stage starts from the previous stage's best checkpoint, trains `epochs` epochs over its shards,
evaluates NDCG@10 on the dev split after every epoch (rank 0), keeps the best epoch (or the starting
weights, when no epoch beats them: `keep_start_if_better`), and writes a checkpoint at every epoch end
and every `checkpoint_every_batches` batches (0: epoch ends only). A checkpoint holds the model, the
optimizer, scheduler and loss parameters, the data position (epoch, batches done) and, per rank, the
random state (torch, CUDA, numpy, random) and the epoch's losses so far; `progress.json` names the last
complete one. A resumed run skips the stages that are done, reloads the checkpoint, skips exactly the
batches it had trained (the shard order depends only on seed, epoch and rank) and restores the random
state, so it trains the same examples in the same order as an uninterrupted run and reaches the same
losses and weights; a fresh stage seeds the generators from (seed, stage). Examples and seconds are
counted per stage across resumes (`result["examples"]`; `examples_this_run` is this launch's share).

    <output_dir>/progress.json
    <output_dir>/stage<k>_<name>/epoch<e>[-batch<b>]/{model/, state.pt, rank<r>.pt}   (the last checkpoint)
    <output_dir>/stage<k>_<name>/best/            (TwoTower folder of the best epoch)
    <output_dir>/final/                           (best model of the last stage, or its interpolation with the
                                                   starting weights that the dev check kept: `interpolate_alphas`)
    <output_dir>/history.json                     (per-step and per-epoch metrics, as of the last checkpoint)

`Dist` hides the backend: none (one process), torch.distributed DDP (gloo on CPU, nccl on GPU,
environment from torchrun or TorchDistributor) or Horovod. The settings are a `TrainSpec` (training.spec);
the loss of a stage, found by name in `training.losses`, collates its rows and computes itself on the
model; `Callback`s (training.callbacks) hook into every step and epoch end.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from annomine.optim import adamw
from annomine.progress import progress_iter
from annomine.publish import write_atomically
from annomine.two_tower import TwoTower
from training.callbacks import Callback, CallbackList
from training.interpolation import check_alphas, interpolate_final
from training.losses import Loss, build_loss
from training.shards import ShardReader, read_manifest, stage_files
from training.spec import TrainSpec

log = logging.getLogger("annomine.train")


# ---- process group -------------------------------------------------------------------------
class Dist:
    """Rank, world size and the few collective operations the runner needs."""

    def __init__(self, backend: str = "auto"):
        self.kind = "none"
        self.rank, self.world_size, self.local_rank, self.local_world_size = 0, 1, 0, 1
        if backend == "horovod":
            import horovod.torch as hvd  # noqa: PLC0415 - optional extra, imported lazily

            hvd.init()
            self.hvd, self.kind = hvd, "horovod"
            self.rank, self.world_size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
            self.local_world_size = hvd.local_size()
            if torch.cuda.is_available():  # one GPU per local rank (Horovod's own convention)
                torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            pg = "nccl" if torch.cuda.is_available() else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(pg)
            self.dist, self.kind = dist, "ddp"
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def wrap(self, module: nn.Module, optimizer=None) -> nn.Module:
        """Before the first step: DDP wraps the module (and broadcasts rank 0's weights); Horovod broadcasts
        rank 0's parameters and buffers, and its optimizer state when there is one (a resumed stage).

        A fresh optimizer holds no state, and every rank built it from the same spec, so there is nothing
        to broadcast; `hvd.broadcast_optimizer_state` is not called then, because on an empty optimizer it
        first takes a step with zero gradients to create the state, and for AdamW that step applies
        weight decay and advances the step count (bias correction): the weights would leave the path
        torchrun takes from the very first update."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(module, device_ids=ids)
        if self.kind == "horovod":
            self.hvd.broadcast_parameters(module.state_dict(), root_rank=0)
            if optimizer is not None and optimizer.state_dict()["state"]:
                self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return module

    def optimizer(self, optimizer, module: nn.Module):
        """Horovod: gradients are averaged by `hvd.DistributedOptimizer` (allreduce hooks, op Average, as
        DDP averages them); the start is synchronised in `wrap`."""
        if self.kind == "horovod":
            optimizer = self.hvd.DistributedOptimizer(optimizer, named_parameters=module.named_parameters())
        return optimizer

    def step(self, optimizer, parameters, max_grad_norm: float) -> None:
        """Clip the gradients averaged over the ranks, then step.

        DDP has averaged them by the end of `backward`. Horovod averages them in `synchronize`, which
        must therefore come first: clipping each rank's own gradients would clip by a different norm on
        every rank, and the ranks' weights would drift apart."""
        if self.kind == "horovod":
            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            with optimizer.skip_synchronize():
                optimizer.step()
            return
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()

    @contextlib.contextmanager
    def alone_on_node(self):
        """Rank 0's dev evaluation: the node's other ranks wait for it at a barrier, so on CPU it runs with
        their torch threads too (each rank has cores / ranks), then goes back to its own share."""
        own = torch.get_num_threads()
        if self.device.type == "cpu" and self.local_world_size > 1:
            torch.set_num_threads(own * self.local_world_size)
        try:
            yield
        finally:
            torch.set_num_threads(own)

    def barrier(self) -> None:
        if self.kind == "ddp":
            self.dist.barrier()
        elif self.kind == "horovod":
            self.hvd.allreduce(torch.zeros(1), name="barrier")

    def mean(self, value: float) -> float:
        if self.kind == "none":
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        if self.kind == "ddp":
            t = t.to(self.device) if self.device.type == "cuda" else t
            self.dist.all_reduce(t)
            return float(t.item()) / self.world_size
        return float(self.hvd.allreduce(t, op=self.hvd.Average).item())

    def broadcast_flag(self, flag: bool) -> bool:
        if self.kind == "none":
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if self.kind == "ddp":
            t = t.to(self.device) if self.device.type == "cuda" else t
            self.dist.broadcast(t, src=0)
            return bool(t.item() > 0.5)
        return bool(self.hvd.broadcast(t, root_rank=0).item() > 0.5)

    def close(self) -> None:
        if self.kind == "ddp" and self.dist.is_initialized():
            self.dist.destroy_process_group()
        elif self.kind == "horovod":
            self.hvd.shutdown()


# ---- batches -------------------------------------------------------------------------------
class TrainModule(nn.Module):
    """Model + loss in one module, so DDP/Horovod synchronise the loss's parameters too."""

    def __init__(self, model: TwoTower, loss: Loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss.loss_on(self.model, batch)


def _to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.to(device) for kk, vv in v.items()}
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


# ---- dev evaluation ------------------------------------------------------------------------
def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, ideal: list[np.ndarray], k: int = 10) -> float:
    """Mean NDCG@k: scores [Q, N] over the pool, gains [Q, N] (0 for unjudged), ideal[q] = judged gains."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for q in range(scores.shape[0]):
        top = np.argsort(-scores[q], kind="stable")[:k]
        dcg = float(((2.0 ** gains[q, top] - 1) * discounts[:len(top)]).sum())
        best = np.sort(ideal[q])[::-1][:k]
        idcg = float(((2.0 ** best - 1) * discounts[:len(best)]).sum())
        if idcg > 0:
            values.append(dcg / idcg)
    return float(np.mean(values)) if values else float("nan")


class DevSet:
    """Dev labelled queries over a fixed candidate pool (from `annomine curriculum`)."""

    def __init__(self, folder: str | os.PathLike, min_grade: int = 1, max_queries: int | None = None):
        import pandas as pd

        folder = Path(folder)
        labels = pd.read_parquet(folder / "dev_eval.parquet")
        pool = pd.read_parquet(folder / "dev_pool.parquet")
        qids = sorted(labels["query_id"].unique())[: max_queries or None]
        judged_elsewhere = set(labels.loc[~labels["query_id"].isin(qids), "product_id"].astype(str))
        labels = labels[labels["query_id"].isin(qids)]
        # drop items judged only for queries left out, so a smaller query set also means a smaller pool
        keep = pool["product_id"].astype(str).isin(set(labels["product_id"].astype(str))) | \
            ~pool["product_id"].astype(str).isin(judged_elsewhere)
        pool = pool[keep]
        self.folder = folder
        self.queries = labels.drop_duplicates("query_id").set_index("query_id").loc[qids, "query"].tolist()
        self.pool_ids = pool["product_id"].astype(str).tolist()
        self.pool_texts = pool["text"].fillna("").astype(str).tolist()
        col = {p: i for i, p in enumerate(self.pool_ids)}
        self.gains = np.zeros((len(qids), len(self.pool_ids)), dtype=np.float64)
        self.ideal = []
        for qi, (qid, grp) in enumerate(labels.groupby("query_id", sort=True)):
            g = (grp["grade"].to_numpy(dtype=float) - min_grade)
            self.ideal.append(g)
            for pid, gain in zip(grp["product_id"].astype(str), g):
                if pid in col:
                    self.gains[qi, col[pid]] = gain

    def __len__(self) -> int:
        return len(self.queries)

    def evaluate(self, model: TwoTower, k: int = 10, progress: bool = False) -> float:
        items = model.encode_items(self.pool_texts, batch_size=128, progress=progress)
        queries = model.encode_queries(self.queries, batch_size=128)
        return ndcg_at_k(queries @ items.T, self.gains, self.ideal, k)

    def fingerprint(self, k: int = 10) -> str:
        """A hash of what `evaluate` reads besides the model: the queries, the pool's texts, the gains and k."""
        import hashlib

        h = hashlib.sha256(json.dumps([k, self.queries, self.pool_texts]).encode())
        h.update(self.gains.tobytes())
        for ideal in self.ideal:
            h.update(np.asarray(ideal, dtype=np.float64).tobytes() + b"|")
        return h.hexdigest()[:32]


START_SCORES = "start_scores.json"  # dev NDCG@10 of starting weights, by fingerprint (RunState.start_metric)


# ---- the runner ----------------------------------------------------------------------------
def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


class MetricSink:
    """Per-step and per-epoch metrics to MLflow (rank 0) and to history.json."""

    def __init__(self, spec: TrainSpec, enabled: bool):
        self.enabled = enabled
        self.history_path = Path(spec.output_dir) / "history.json"
        self.history = _read_json(self.history_path, {"steps": [], "epochs": []}) if enabled else None
        self.client = None
        if enabled and spec.tracking is not None:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(spec.tracking.tracking_uri), spec.tracking.run_id

    def log(self, kind: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.history[kind].append({"step": step, **metrics})
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                        if v is not None and math.isfinite(float(v))])

    def flush(self) -> None:
        if self.enabled:
            _write_json(self.history_path, self.history)


def _scheduler(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stage_key(entry: dict) -> str:
    return f"stage{entry['stage']}_{entry['name']}"


# ---- random state --------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's random generators (torch, CUDA, numpy, random), to save with a checkpoint."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(*key: int) -> None:
    """Seed every generator from `key`: a stage's dropout does not depend on what ran before it."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _resume_position(state: dict, stage_dir: Path) -> dict | None:
    """Where an interrupted stage goes on: {"dir", "epoch", "batch"} (next batch to train), or None."""
    if state.get("checkpoint"):
        return state["checkpoint"]
    if state.get("last_epoch"):  # progress written before batch checkpoints: epoch ends only
        return {"dir": str(stage_dir / f"epoch{state['last_epoch']}"), "epoch": int(state["last_epoch"]) + 1, "batch": 0}
    return None


# ---- the runner ----------------------------------------------------------------------------
class RunState:
    """What the stages of one launch share: spec, process group, output folder, progress, dev set, metrics,
    callbacks."""

    def __init__(self, spec: TrainSpec, dist: Dist, callbacks: Callback | None = None):
        self.spec, self.dist = spec, dist
        self.callbacks = callbacks or CallbackList()
        self.out = Path(spec.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = _read_json(self.out / "progress.json", {"stages": {}}) if spec.resume else {"stages": {}}
        self.device = dist.device
        self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported() and spec.bf16
        dev_dir = spec.dev_dir
        self.dev = DevSet(dev_dir, spec.min_grade, spec.dev_max_queries) \
            if dist.is_main and dev_dir and (Path(dev_dir) / "dev_eval.parquet").is_file() else None
        self.sink = MetricSink(spec, dist.is_main)
        self.global_step = int(self.progress.get("global_step", 0))
        self.examples_this_run = 0

    def evaluate(self, model: TwoTower, progress: bool = False) -> float:
        """Dev NDCG@10 of `model` (rank 0, with the threads of the ranks waiting for it)."""
        with self.dist.alone_on_node():
            return self.dev.evaluate(model, progress=progress)

    def start_metric(self, model: TwoTower, progress: bool = False) -> float:
        """Dev NDCG@10 of a stage's starting weights. Scores are kept in `start_scores.json` (in the spec's
        `score_cache_dir`, else the dev set's folder) by the dev set's and the model's fingerprints: a variant that
        starts from weights scored before (another variant's base model) reads the score instead of evaluating them
        again."""
        path = Path(self.spec.score_cache_dir or self.dev.folder) / START_SCORES
        key = f"{self.dev.fingerprint()}:{model.fingerprint()}"
        try:
            known = _read_json(path, {})
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s): the starting weights are evaluated", path, exc)
            known = {}
        if key in known:
            log.info("starting weights scored on this dev set before (%s)", path)
            return float(known[key])
        value = self.evaluate(model, progress)
        try:  # a unique temporary file, renamed: trainings sharing the folder never see a half-written one
            write_atomically(path, lambda tmp: tmp.write_text(json.dumps({**known, key: value}, indent=2)))
        except OSError as exc:
            log.warning("could not keep the starting weights' dev score in %s: %s", path, exc)
        return value

    def commit(self, key: str, state: dict) -> None:
        """Rank 0: record a stage's state (after its checkpoint is complete on every rank)."""
        self.progress["stages"][key] = state
        self.progress["global_step"] = self.global_step
        _write_json(self.out / "progress.json", self.progress)
        self.sink.flush()


class StageTrainer:
    """One stage: from its starting weights, or from its last checkpoint (model, optimizer, scheduler,
    loss parameters, data position, every rank's random state and running epoch loss)."""

    def __init__(self, run: RunState, entry: dict, init_from: str | None, prev_best: float | None):
        spec = run.spec
        self.run, self.entry, self.prev_best = run, entry, prev_best
        self.key = stage_key(entry)
        self.dir = run.out / self.key
        self.best_dir = self.dir / "best"
        self.epochs = int(entry.get("epochs") or spec.epochs_per_stage)
        self.state = dict(run.progress["stages"].get(self.key, {}))
        self.pos = _resume_position(self.state, self.dir)
        self.best = self.state.get("best_metric")
        self.examples, self.seconds = int(self.state.get("examples", 0)), float(self.state.get("seconds", 0.0))
        self.every = int(spec.checkpoint_every_batches or 0)
        self._build(init_from)

    def _build(self, init_from: str | None) -> None:
        spec, dist, entry = self.run.spec, self.run.dist, self.entry
        base = Path(self.pos["dir"]) / "model" if self.pos else init_from
        self.model = TwoTower.load(base) if base else TwoTower.from_base(
            spec.base_model, shared=spec.shared, query_max_len=spec.query_max_len, item_max_len=spec.item_max_len)
        self.model.to(self.run.device).train()
        self.loss_fn = build_loss(entry["loss"], spec.loss_params(entry["loss"]))
        self.module = TrainModule(self.model, self.loss_fn).to(self.run.device)
        self.reader = ShardReader(stage_files(spec.shards_root, entry), rank=dist.rank, world_size=dist.world_size,
                                  batch_size=spec.batch_size, seed=spec.seed, shuffle_buffer=spec.shuffle_buffer,
                                  columns=list(self.loss_fn.columns))
        self.steps = self.reader.steps_per_epoch
        if spec.max_steps_per_epoch:
            self.steps = min(self.steps, int(spec.max_steps_per_epoch))
        self.lr = spec.lr_for(entry["loss"]) if entry.get("lr") is None else float(entry["lr"])  # a stage's own lr wins
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.lr,
                   "weight_decay": spec.weight_decay}]
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": spec.loss_lr, "weight_decay": 0.0})
        self.optimizer = dist.optimizer(adamw(groups), self.module)
        self.scheduler = _scheduler(self.optimizer, self.steps * self.epochs, spec.warmup_ratio)
        self.wrapped = None

    def _restore(self) -> dict | None:
        """Optimizer, scheduler and loss state of the checkpoint; this rank's part (random state, epoch so far)."""
        ck = Path(self.pos["dir"])
        saved = torch.load(ck / "state.pt", map_location=self.run.device, weights_only=False)
        self.loss_fn.load_state_dict(saved["loss"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        mine = ck / f"rank{self.run.dist.rank}.pt"
        log.info("resuming %s at epoch %d, batch %d (%s)", self.key, self.pos["epoch"], self.pos["batch"], ck.name)
        return torch.load(mine, weights_only=False) if mine.is_file() else None

    def _start(self) -> None:
        """A fresh stage: its starting weights compete with its epochs on dev (`keep_start_if_better`)."""
        run, spec = self.run, self.run.spec
        self.state.update(stage=self.entry["stage"], name=self.entry["name"], loss=self.entry["loss"], lr=self.lr,
                          best_dir=str(self.best_dir), last_epoch=0, done=False)
        if run.dev is not None and spec.keep_start_if_better:
            # a stage that makes the model worse on dev is dropped (its best is the starting model)
            self.best = self.prev_best if self.prev_best is not None else run.start_metric(
                self.model, progress=spec.progress)
            self.model.save(self.best_dir)
            self.state.update(start_metric=self.best, best_epoch=0)
            log.info("%s starts at dev NDCG@10 %.4f", self.key, self.best)

    def train(self) -> None:
        run = self.run
        try:
            partial = self._restore() if self.pos else self._start()
            self.wrapped = run.dist.wrap(self.module, self.optimizer)
            first, start = (int(self.pos["epoch"]), int(self.pos["batch"])) if self.pos else (1, 0)
            if partial is not None:
                set_rng_state(partial["rng"])
            else:
                seed_all(run.spec.seed, self.entry["stage"], first, start)
            for epoch in range(first, self.epochs + 1):
                if epoch == first:
                    self._epoch(epoch, start, partial)
                else:
                    self._epoch(epoch, 0, None)
        finally:
            # release the wrapped model and optimizer before the next stage (and before the group closes)
            self.wrapped = self.optimizer = self.scheduler = self.module = self.model = self.loss_fn = None

    def _step(self, rows: list[dict]) -> float:
        run, spec = self.run, self.run.spec
        batch = _to_device(self.loss_fn.collate(rows, self.model), run.device)
        with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            loss = self.wrapped(batch)
        self.optimizer.zero_grad()  # set_to_none by default (torch 2); Horovod's optimizer takes no argument
        loss.backward()
        run.dist.step(self.optimizer, self.module.parameters(), spec.max_grad_norm)
        self.scheduler.step()
        return float(loss.detach())

    def _epoch(self, epoch: int, start: int, partial: dict | None) -> None:
        run, spec, dist = self.run, self.run.spec, self.run.dist
        self.wrapped.train()
        batches = self.reader.epoch(epoch - 1, start=start)
        so_far = partial or {"losses": [], "examples": 0, "seconds": 0.0}
        losses, n_ex, seconds = list(so_far["losses"]), int(so_far["examples"]), float(so_far["seconds"])
        steps = range(start, self.steps)
        if dist.is_main and spec.progress:
            steps = progress_iter(steps, desc=f"{self.key} epoch {epoch}/{self.epochs}", unit="step",
                                  total=self.steps, initial=start)
        for b in steps:
            rows = next(batches)
            t0 = time.time()
            losses.append(self._step(rows))
            took = time.time() - t0
            seconds, self.seconds = seconds + took, self.seconds + took
            k = len(rows) * dist.world_size
            n_ex, self.examples, run.examples_this_run = n_ex + k, self.examples + k, run.examples_this_run + k
            run.global_step += 1
            if run.global_step % spec.log_every == 0 or b == self.steps - 1:
                self._log_step(losses, n_ex / max(seconds, 1e-9))
            if self.every and (b + 1) % self.every == 0 and b + 1 < self.steps:
                self._checkpoint(f"epoch{epoch}-batch{b + 1}", {"epoch": epoch, "batch": b + 1},
                                 {"losses": losses, "examples": n_ex, "seconds": seconds})
            run.callbacks.on_step(self, b)
        self._end_epoch(epoch, losses, n_ex / max(seconds, 1e-9))

    def _log_step(self, losses: list[float], examples_per_s: float) -> None:
        every = self.run.spec.log_every
        metrics = {"train_loss": float(np.mean(losses[-every:])), "lr": self.scheduler.get_last_lr()[0],
                   "examples_per_s": examples_per_s, "stage": self.entry["stage"], **self.loss_fn.step_metrics()}
        self.run.sink.log("steps", self.run.global_step, metrics)

    def _end_epoch(self, epoch: int, losses: list[float], examples_per_s: float) -> None:
        run, spec, dist = self.run, self.run.spec, self.run.dist
        mean_loss = dist.mean(float(np.mean(losses)) if losses else float("nan"))
        if dist.is_main:
            ndcg = run.evaluate(self.model, progress=spec.progress) if run.dev is not None else None
            if self.best is None or ndcg is None or (not math.isnan(ndcg) and ndcg > self.best):
                self.best = ndcg if ndcg is not None else self.best
                self.state["best_epoch"] = epoch
                if self.best_dir.exists():
                    shutil.rmtree(self.best_dir)
                self.model.save(self.best_dir)
            run.sink.log("epochs", run.global_step, {"epoch_loss": mean_loss, "dev_ndcg10": ndcg,
                                                     "epoch_examples_per_s": examples_per_s,
                                                     "stage": self.entry["stage"], "epoch": epoch})
            log.info("%s epoch %d: loss %.4f, dev NDCG@10 %s, %.1f examples/s", self.key, epoch, mean_loss,
                     "n/a" if ndcg is None else f"{ndcg:.4f}", examples_per_s)
            self.state.update(last_epoch=epoch, done=epoch == self.epochs)
        self._checkpoint(f"epoch{epoch}", {"epoch": epoch + 1, "batch": 0}, {"losses": [], "examples": 0, "seconds": 0.0})
        dist.barrier()
        run.callbacks.on_epoch_end(self, epoch)

    def _checkpoint(self, name: str, position: dict, epoch_so_far: dict) -> None:
        """Every rank saves its part, then rank 0 commits it in progress.json and drops the previous one.

        Until the commit progress.json names the previous checkpoint, so a kill at any moment leaves a
        complete checkpoint to resume from."""
        run, dist = self.run, self.run.dist
        ck = self.dir / name
        ck.mkdir(parents=True, exist_ok=True)
        torch.save({"rng": rng_state(), **epoch_so_far}, ck / f"rank{dist.rank}.pt")
        if dist.is_main:
            self.model.save(ck / "model")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "loss": self.loss_fn.state_dict(), "position": position}, ck / "state.pt")
        dist.barrier()
        if not dist.is_main:
            return
        previous = (self.state.get("checkpoint") or {}).get("dir")
        self.state.update(best_metric=self.best, examples=self.examples, seconds=self.seconds,
                          checkpoint={"dir": str(ck), **position})
        run.commit(self.key, dict(self.state))
        if previous and previous != str(ck):
            shutil.rmtree(previous, ignore_errors=True)


def _start_model(spec: TrainSpec) -> TwoTower:
    """The weights the first stage started from."""
    if spec.init_from:
        return TwoTower.load(spec.init_from)
    return TwoTower.from_base(spec.base_model, shared=spec.shared, query_max_len=spec.query_max_len,
                              item_max_len=spec.item_max_len)


def _finish(run: RunState, stages: list[dict]) -> dict:
    """The result of the whole run (rank 0): every stage's state, examples and seconds across resumes."""
    if not run.dist.is_main:
        return {"stages": [], "examples": 0, "train_seconds": 0.0, "examples_this_run": run.examples_this_run}
    states = [run.progress["stages"][stage_key(e)] for e in stages]
    examples, seconds = sum(int(s.get("examples", 0)) for s in states), sum(float(s.get("seconds", 0.0)) for s in states)
    final = run.out / "final"
    if final.exists():
        shutil.rmtree(final)
    result = {"stages": states, "examples": examples, "train_seconds": seconds, "examples_this_run": run.examples_this_run,
              "final_dir": str(final), "world_size": run.dist.world_size, "examples_per_s": examples / max(seconds, 1e-9)}
    last = states[-1]
    if run.spec.interpolate_alphas and run.dev is not None and last.get("best_metric") is not None:
        chosen = interpolate_final(_start_model(run.spec), last["best_dir"], last["best_metric"], run.spec.interpolate_alphas,
                                   run.evaluate, final)
        result["interpolation"] = {"alpha": chosen["alpha"], "dev_metric": chosen["metric"],
                                   "dev": {f"{a:g}": m for a, m in chosen["dev"].items()}}
        log.info("final model: %.2f of the way from the starting weights (dev NDCG@10 %.4f)", chosen["alpha"], chosen["metric"])
    else:
        shutil.copytree(last["best_dir"], final)
    _write_json(run.out / "result.json", result)
    return result


def run_stages(spec: TrainSpec, dist: Dist, callbacks: list[Callback] | tuple = ()) -> dict:
    """Train every stage of the manifest in order; returns the result (meaningful on rank 0)."""
    check_alphas(spec.interpolate_alphas)
    torch.manual_seed(spec.seed)
    run = RunState(spec, dist, CallbackList(callbacks))
    stages = read_manifest(spec.shards_root)["stages"]
    init_from, prev_best = spec.init_from, None  # prev_best: dev NDCG@10 the next stage starts from
    for entry in stages:
        state = run.progress["stages"].get(stage_key(entry), {})
        if not state.get("done"):
            trainer = StageTrainer(run, entry, init_from, prev_best)
            trainer.train()
            state = run.progress["stages"].get(stage_key(entry), {}) if dist.is_main else {}
            del trainer
            gc.collect()
        init_from = state.get("best_dir") or str(run.out / stage_key(entry) / "best")
        prev_best = state.get("best_metric")
    result = _finish(run, stages)
    dist.barrier()
    return result
