"""The stage runner: trains the curriculum's stages in order on one rank of a process group.

Each stage starts from the previous stage's best checkpoint, trains `epochs` epochs over its shards,
evaluates NDCG@10 on the dev split after every epoch (rank 0), keeps the best epoch (or the starting
weights, when no epoch beats them: `keep_start_if_better`), and writes a
checkpoint per epoch (model, optimizer, scheduler, loss parameters). `progress.json` in the output
folder records what is done, so a crashed run resumes from its last checkpoint: finished stages are
skipped and the interrupted stage continues after its last saved epoch.

    <output_dir>/progress.json
    <output_dir>/stage<k>_<name>/epoch<e>/{model/, state.pt}
    <output_dir>/stage<k>_<name>/best/            (TwoTower folder of the best epoch)
    <output_dir>/final/                           (best model of the last stage)
    <output_dir>/history.json                     (per-step and per-epoch metrics)

`Dist` hides the backend: none (one process), torch.distributed DDP (gloo on CPU, nccl on GPU,
environment from torchrun or TorchDistributor) or Horovod.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.losses import build_loss
from training.model import TwoTower
from training.shards import ShardReader, read_manifest, stage_files

log = logging.getLogger("annomine.train")


# ---- process group -------------------------------------------------------------------------
class Dist:
    """Rank, world size and the few collective operations the runner needs."""

    def __init__(self, backend: str = "auto"):
        self.kind = "none"
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        if backend == "horovod":
            import horovod.torch as hvd  # noqa: PLC0415 - optional extra, imported lazily

            hvd.init()
            self.hvd, self.kind = hvd, "horovod"
            self.rank, self.world_size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            pg = "nccl" if torch.cuda.is_available() else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(pg)
            self.dist, self.kind = dist, "ddp"
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(module, device_ids=ids)
        if self.kind == "horovod":
            self.hvd.broadcast_parameters(module.state_dict(), root_rank=0)
        return module

    def optimizer(self, optimizer, module: nn.Module):
        if self.kind == "horovod":
            optimizer = self.hvd.DistributedOptimizer(optimizer, named_parameters=module.named_parameters())
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return optimizer

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

    def __init__(self, model: TwoTower, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict) -> torch.Tensor:
        m, kind = self.model, self.loss.name
        q = m.embed(batch["query"], "query")
        if kind == "bce":
            return self.loss(q, m.embed(batch["item"], "item"), batch["label"])
        if kind == "mnr":
            neg = m.embed(batch["neg"], "item") if batch.get("neg") is not None else None
            return self.loss(q, m.embed(batch["item"], "item"), neg)
        if kind == "triplet":
            return self.loss(q, m.embed(batch["item"], "item"), m.embed(batch["neg"], "item"))
        items = m.embed(batch["group"], "item").view(q.size(0), batch["grades"].size(1), -1)
        return self.loss(q, items, batch["grades"], batch["valid"])


def collate(rows: list[dict], loss: str, model: TwoTower) -> dict:
    """Row dicts from the shard reader -> token tensors for `TrainModule`."""
    batch = {"query": model.tokenize([r["query"] or "" for r in rows], "query")}
    if loss == "roar":
        k = max(len(r["group_texts"]) for r in rows)
        texts, grades, valid = [], torch.zeros(len(rows), k, dtype=torch.long), torch.zeros(len(rows), k, dtype=torch.bool)
        for i, r in enumerate(rows):
            g = list(r["group_texts"])
            texts += g + [""] * (k - len(g))
            grades[i, :len(g)] = torch.tensor(list(r["group_grades"]), dtype=torch.long)
            valid[i, :len(g)] = True
        batch.update(group=model.tokenize(texts, "item"), grades=grades, valid=valid)
        return batch
    batch["item"] = model.tokenize([r["item_text"] or "" for r in rows], "item")
    if loss == "bce":
        batch["label"] = torch.tensor([float(r["label"]) for r in rows])
    else:
        negs = [r["neg_text"] for r in rows if r.get("neg_text") is not None]
        batch["neg"] = model.tokenize(negs, "item") if negs else None
    return batch


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

    def __init__(self, spec: dict, enabled: bool):
        self.enabled = enabled
        self.history_path = Path(spec["output_dir"]) / "history.json"
        self.history = _read_json(self.history_path, {"steps": [], "epochs": []}) if enabled else None
        self.client = None
        ml = spec.get("mlflow") or {}
        if enabled and ml.get("run_id"):
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(ml["tracking_uri"]), ml["run_id"]

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


def run_stages(spec: dict, dist: Dist) -> dict:
    """Train every stage of the manifest in order; returns the result (meaningful on rank 0)."""
    torch.manual_seed(spec.get("seed", 13))
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(spec["shards_root"])
    stages = manifest["stages"]
    progress = _read_json(out / "progress.json", {"stages": {}}) if spec.get("resume", True) else {"stages": {}}
    device = dist.device
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() and spec.get("bf16", True)
    dev = DevSet(spec["dev_dir"], spec.get("min_grade", 1), spec.get("dev_max_queries")) if dist.is_main and spec.get("dev_dir") \
        and (Path(spec["dev_dir"]) / "dev_eval.parquet").is_file() else None
    sink = MetricSink(spec, dist.is_main)
    init_from = spec.get("init_from")
    global_step = int(progress.get("global_step", 0))
    prev_best = None  # dev NDCG@10 of the model the next stage starts from (rank 0)
    result = {"stages": [], "examples": 0, "train_seconds": 0.0}
    for entry in stages:
        key = f"stage{entry['stage']}_{entry['name']}"
        state = progress["stages"].get(key, {})
        stage_dir = out / key
        if state.get("done"):
            init_from, prev_best = state["best_dir"], state.get("best_metric")
            result["stages"].append(state)
            continue
        epochs = int(entry.get("epochs") or spec.get("epochs_per_stage", 1))
        last_epoch = int(state.get("last_epoch", 0))
        resume_dir = stage_dir / f"epoch{last_epoch}" if last_epoch else None
        base = resume_dir / "model" if resume_dir else init_from
        model = TwoTower.load(base) if base else TwoTower.from_base(
            spec.get("base_model", "minilm"), shared=spec.get("shared", True),
            query_max_len=spec.get("query_max_len", 16), item_max_len=spec.get("item_max_len", 64))
        model.to(device).train()
        loss_fn = build_loss(entry["loss"], (spec.get("losses") or {}).get(entry["loss"]))
        module = TrainModule(model, loss_fn).to(device)
        reader = ShardReader(stage_files(spec["shards_root"], entry), rank=dist.rank, world_size=dist.world_size,
                             batch_size=spec.get("batch_size", 64), seed=spec.get("seed", 13),
                             shuffle_buffer=spec.get("shuffle_buffer", 2048))
        steps = reader.steps_per_epoch
        if spec.get("max_steps_per_epoch"):
            steps = min(steps, int(spec["max_steps_per_epoch"]))
        lr = (spec.get("lr_by_loss") or {}).get(entry["loss"], spec.get("lr", 2e-5))
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                   "weight_decay": spec.get("weight_decay", 0.01)}]
        loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": spec.get("loss_lr", 1e-2), "weight_decay": 0.0})
        optimizer = dist.optimizer(torch.optim.AdamW(groups), module)
        scheduler = _scheduler(optimizer, steps * epochs, spec.get("warmup_ratio", 0.1))
        if resume_dir:
            saved = torch.load(resume_dir / "state.pt", map_location=device, weights_only=False)
            loss_fn.load_state_dict(saved["loss"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            log.info("resuming %s after epoch %d", key, last_epoch)
        wrapped = dist.wrap(module)
        best = state.get("best_metric")
        best_dir = stage_dir / "best"
        if not last_epoch and dev is not None and spec.get("keep_start_if_better", True):
            # the weights the stage starts from compete with its epochs: a stage that makes the model
            # worse on dev is dropped (its best is the starting model) instead of being passed on
            best = prev_best if prev_best is not None else dev.evaluate(model, progress=spec.get("progress", True))
            model.save(best_dir)
            state = {**state, "start_metric": best, "best_epoch": 0}
            log.info("%s starts at dev NDCG@10 %.4f", key, best)
        stage_examples, stage_seconds = 0, 0.0
        for epoch in range(last_epoch + 1, epochs + 1):
            wrapped.train()
            batches = reader.epoch(epoch - 1)
            bar = range(steps)
            if dist.is_main and spec.get("progress", True):
                from tqdm import tqdm

                bar = tqdm(bar, desc=f"{key} epoch {epoch}/{epochs}", unit="step", mininterval=5)
            losses, t0, n_ex = [], time.time(), 0
            for _ in bar:
                rows = next(batches)
                batch = _to_device(collate(rows, entry["loss"], model), device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = wrapped(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), spec.get("max_grad_norm", 1.0))
                optimizer.step()
                scheduler.step()
                global_step += 1
                n_ex += len(rows) * dist.world_size
                losses.append(float(loss.detach()))
                if global_step % spec.get("log_every", 10) == 0 or _ == steps - 1:
                    elapsed = time.time() - t0
                    metrics = {"train_loss": float(np.mean(losses[-spec.get("log_every", 10):])),
                               "lr": scheduler.get_last_lr()[0], "examples_per_s": n_ex / max(elapsed, 1e-9),
                               "stage": entry["stage"]}
                    if entry["loss"] == "bce":
                        metrics["bce_temperature"] = float(loss_fn.temperature.detach())
                    if hasattr(loss_fn, "last_masked"):
                        metrics["masked_negatives"] = loss_fn.last_masked
                    sink.log("steps", global_step, metrics)
            elapsed = time.time() - t0
            stage_examples += n_ex
            stage_seconds += elapsed
            mean_loss = dist.mean(float(np.mean(losses)) if losses else float("nan"))
            ndcg = None
            if dist.is_main:
                ndcg = dev.evaluate(model, progress=spec.get("progress", True)) if dev is not None else None
                improved = best is None or ndcg is None or (not math.isnan(ndcg) and ndcg > best)
                ck = stage_dir / f"epoch{epoch}"
                model.save(ck / "model")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "loss": loss_fn.state_dict(), "epoch": epoch}, ck / "state.pt")
                if improved:
                    best = ndcg if ndcg is not None else best
                    state["best_epoch"] = epoch
                    if best_dir.exists():
                        shutil.rmtree(best_dir)
                    shutil.copytree(ck / "model", best_dir)
                prev = stage_dir / f"epoch{epoch - 1}"
                if prev.exists() and not spec.get("keep_all_epochs", False):
                    shutil.rmtree(prev)
                sink.log("epochs", global_step, {"epoch_loss": mean_loss, "dev_ndcg10": ndcg,
                                                 "epoch_examples_per_s": n_ex / max(elapsed, 1e-9),
                                                 "stage": entry["stage"], "epoch": epoch})
                log.info("%s epoch %d: loss %.4f, dev NDCG@10 %s, %.1f examples/s", key, epoch, mean_loss,
                         "n/a" if ndcg is None else f"{ndcg:.4f}", n_ex / max(elapsed, 1e-9))
                state = {**state, "stage": entry["stage"], "name": entry["name"], "loss": entry["loss"], "last_epoch": epoch,
                         "best_metric": best, "best_dir": str(best_dir), "done": epoch == epochs, "lr": lr,
                         "examples": state.get("examples", 0) + n_ex, "seconds": state.get("seconds", 0.0) + elapsed}
                progress["stages"][key] = state
                progress["global_step"] = global_step
                _write_json(out / "progress.json", progress)
                sink.flush()
            if spec.get("dump_params"):  # every rank: its parameters after the epoch (the DDP sync test)
                flat = torch.cat([p.detach().float().cpu().reshape(-1) for p in module.parameters()])
                torch.save(flat, out / f"params_{key}_epoch{epoch}_rank{dist.rank}.pt")
            dist.barrier()
            if spec.get("fail_after_epoch") == [entry["stage"], epoch]:  # crash injection for the resume test
                raise RuntimeError(f"injected failure after stage {entry['stage']} epoch {epoch}")
        result["examples"] += stage_examples
        result["train_seconds"] += stage_seconds
        if dist.is_main:
            result["stages"].append(progress["stages"][key])
        init_from = str(best_dir)
        prev_best = progress["stages"][key].get("best_metric") if dist.is_main else None
        # release the wrapped model and optimizer before the next stage (and before the group closes)
        del wrapped, optimizer, scheduler, module, model, loss_fn
        import gc

        gc.collect()
    if dist.is_main:
        final = out / "final"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(init_from, final)
        result.update(final_dir=str(final), world_size=dist.world_size,
                      examples_per_s=result["examples"] / max(result["train_seconds"], 1e-9))
        _write_json(out / "result.json", result)
    dist.barrier()
    return result
