"""Stage `train`: the two-tower retriever through the curriculum's stages, tracked in MLflow.

Reads the shard set `annomine curriculum` published for `train.variant` (refusing one whose files do not
match its manifest, and holding it so no curriculum run removes it meanwhile), runs the same
per-rank training function under the configured launcher (inprocess, torchrun, torch_distributor,
horovod), resumes from the last checkpoint when a previous run of the same spec was interrupted (the
resumed run trains exactly what the uninterrupted one would have: training.runner), and publishes the
final model. Killing the driver ends torchrun and its ranks (annomine.lifeline). Outputs:

    <warehouse>/models/<variant>/model-<tag>/  TwoTower folder (annomine.two_tower.TwoTower.load), new for each run
    <warehouse>/models/<variant>/run/          checkpoints, progress.json, history.json, loss_curve.png
    <warehouse>/models/<variant>.json          {"path", "variant", "mlflow_run_id", "model_uri", ...}
    <warehouse>/models/best.json               the same pointer, for `train.best_variant` only (the pipeline's final
                                               model; training another variant by hand leaves it alone)

A model is written whole into its new folder before the pointers are switched to it (annomine.publish:
"path" is relative to the pointer's folder, written by one rename), so a reader sees the old model or the
new one; model folders no pointer references (a killed run's, superseded ones) are removed by the next train.

After `train.variant`, each variant of `train.baselines` is trained the same way and published under its own
pointer only (models/<baseline>.json): the shipped configs train `human`, fine-tuning on the human labels
alone, so the closing report shows whether the pipeline's model beat it. A baseline whose shards the curriculum
did not publish is skipped with a notice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from annomine.bounds import bounded
from annomine.errors import MissingInputError
from annomine.locks import warehouse_lock
from annomine.publish import PointerError, note_write, read_pointer, reading, remove_unreferenced, run_folder, write_pointer
from annomine.runtime import JobContext, run_job
from training.interpolation import check_alphas
from training.launchers import LAUNCHERS, launch
from training.losses import REGISTRY as LOSS_REGISTRY
from training.shards import MANIFEST, check_shards, published_shards
from training.spec import TrainSettings, TrainSpec, Tracking

log = logging.getLogger("annomine.train")


# `train.losses.<loss>.<param>`: one block per registered loss, its params dataclass (training.losses, where
# its defaults live), e.g. losses.bce.init_temperature, losses.mnr.margin_delta (null: no false-negative mask)
LossesConfig = dataclasses.make_dataclass(
    "LossesConfig", [(name, loss.Params, field(default_factory=loss.Params)) for name, loss in LOSS_REGISTRY.items()])
LossesConfig.__module__ = __name__


@dataclass
class TrainConfig(TrainSettings):
    """The `train` section: the training settings (training.spec.TrainSettings: model, optimisation,
    checkpoints, logging; they reach every rank in the TrainSpec) plus what only this job uses."""

    variant: str = "curriculum"
    # The variant models/best.json points to (the pipeline's final model); empty: whichever variant was trained last.
    best_variant: str | None = None
    losses: LossesConfig = field(default_factory=LossesConfig)
    launcher: str = "auto"  # auto: inprocess for 1 process, torchrun for more
    num_proc: int = bounded(2, ge=1)  # ranks; batch_size is per rank
    lock_wait_s: float = bounded(0.0, ge=0)  # another train on this warehouse: wait this long for it, then stop naming it
    shards_dir: str | None = None  # default <warehouse>/shards
    log_checkpoints: bool = True
    mlflow: bool = True
    # Variants (curriculum.variants) trained after `variant`, each published under its own pointer only: `human`,
    # fine-tuning on the human labels alone, is what a team would do without this pipeline.
    baselines: list[str] = field(default_factory=lambda: ["human"])

    def validate(self) -> None:
        named = [("variant", self.variant), *((f"baselines[{i}]", b) for i, b in enumerate(self.baselines))]
        for key, name in named + ([("best_variant", self.best_variant)] if self.best_variant else []):
            if not VARIANT_NAME.fullmatch(str(name)) or name == "best":
                raise ValueError(f"{key}: {name!r} is not a variant name (curriculum.variants: letters, digits, _)")
        if self.launcher not in ("auto", *LAUNCHERS):
            raise ValueError(f"launcher must be auto or one of {list(LAUNCHERS)}, got {self.launcher!r}")
        check_alphas(self.interpolate_alphas)
        unknown = set(self.lr_by_loss) - set(LOSS_REGISTRY)
        if unknown:
            raise ValueError(f"lr_by_loss: unknown loss {sorted(unknown)}; use one of {list(LOSS_REGISTRY)}")


CONFIG_CLASS = TrainConfig


VARIANT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MODEL_PREFIX = "model-"  # models/<name>/model-<tag>/: one folder per published model


def models_root(ctx: JobContext) -> Path:
    return ctx.project.outputs_path / "models"


def shards_dir(ctx: JobContext, cfg: TrainConfig) -> Path:
    """The folder of the curriculum's published shard sets, one subfolder per variant."""
    return Path(cfg.shards_dir).expanduser().resolve() if cfg.shards_dir else ctx.project.outputs_path / "shards"


def build_spec(ctx: JobContext, cfg: TrainConfig, name: str | None = None) -> TrainSpec:
    """The spec every rank receives: the config's training settings, placed in this warehouse. It trains
    `cfg.variant`'s shards into models/<name>/run (name: the variant, or a soup's member)."""
    shards = shards_dir(ctx, cfg)
    losses = {f.name: getattr(cfg.losses, f.name) for f in dataclasses.fields(cfg.losses)}
    return TrainSpec.of(cfg, shards_root=str(shards / cfg.variant), dev_dir=str(shards),
                        output_dir=str(models_root(ctx) / (name or cfg.variant) / "run"), min_grade=ctx.project.min_grade,
                        losses=losses, score_cache_dir=str(ctx.project.warehouse_path / "cache" / "train"))


def fingerprint(spec: TrainSpec, manifest: dict, num_proc: int) -> str:
    """What a resumable run must share with the interrupted one: the spec (less its volatile fields:
    threads, resume, progress, logging, checkpoint interval, MLflow run), the data, the world size."""
    text = json.dumps([spec.resume_key(), manifest, num_proc], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _prepare_run_dir(spec: TrainSpec, manifest: dict, cfg: TrainConfig, name: str) -> Path:
    """The run folder: kept when it holds a resumable run of this spec, else started afresh."""
    run_dir = Path(spec.output_dir)
    fp = fingerprint(spec, manifest, cfg.num_proc)
    fp_file = run_dir / "fingerprint.txt"
    if run_dir.exists() and (not cfg.resume or not fp_file.is_file() or fp_file.read_text().strip() != fp):
        log.info("starting %s afresh (no resumable run of this spec in %s)", name, run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fp)
    return run_dir


def _start_tracking(ctx: JobContext, cfg: TrainConfig, run_dir: Path, manifest: dict, name: str) -> str:
    """Start (or, resuming, reopen) the MLflow run; its id."""
    from annomine.tracking import artifact_root
    from training.tracking import start_run

    id_file = run_dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if id_file.is_file() else None
    params = {"train": dataclasses.asdict(cfg), "project": {"seed": ctx.project.seed, "name": ctx.project.name},
              "data": {"stages": [{k: s[k] for k in ("stage", "name", "loss", "rows")} for s in manifest["stages"]],
                       "sources": manifest.get("sources")}}
    run_id = start_run(ctx.project.tracking_uri, ctx.project.mlflow_experiment, f"train-{name}", params, previous,
                       artifact_root(ctx.project))
    id_file.write_text(run_id)
    return run_id


def training_pairs(stages: list[dict], manifest: dict) -> dict[str, int]:
    """Examples per data source (`mined`: judge-graded mined pairs, `human`: human labels) in the stages the
    final model kept; a stage whose dev check dropped it (best epoch 0: the starting weights won) counts 0. A stage
    of both sources (curriculum_with_human) splits its examples by its rows' shares (`source_rows`)."""
    shares_of = {e["stage"]: e.get("source_rows") or {e.get("source", "mined"): 1} for e in manifest["stages"]}
    used = {"mined": 0, "human": 0}
    for s in stages:
        if s.get("best_epoch") != 0:
            shares = shares_of.get(s["stage"], {"mined": 1})
            total = sum(shares.values()) or 1
            for key, rows in shares.items():
                used[key] = used.get(key, 0) + round(int(s.get("examples") or 0) * rows / total)
    return used


def _publish(ctx: JobContext, cfg: TrainConfig, result: dict, run: dict, name: str) -> dict:
    """Copy the final model into a new folder, log it to MLflow, switch the pointers to it; the pointer."""
    with run_folder(models_root(ctx) / name, MODEL_PREFIX) as final:
        shutil.copytree(result["final_dir"], final, dirs_exist_ok=True, copy_function=_copy_noted)
        return _publish_folder(ctx, cfg, result, run, name, final)


def _copy_noted(src: str, dst: str) -> str:
    out = shutil.copy2(src, dst)
    note_write(dst)
    return out


def _publish_folder(ctx: JobContext, cfg: TrainConfig, result: dict, run: dict, name: str, final: Path) -> dict:
    model_uri = None
    if cfg.mlflow:
        from training.tracking import log_outputs

        model_uri = log_outputs(ctx.project.tracking_uri, run["run_id"], run["run_dir"], final, result, cfg.log_checkpoints)
    # examples and seconds count the whole training of this model, across interruptions and resumes
    pointer = {"path": str(final), "variant": name, "mlflow_run_id": run["run_id"], "model_uri": model_uri,
               "trained": cfg.variant, "seed": cfg.seed,
               "base_model": cfg.base_model, "launcher": run["launcher"], "num_proc": cfg.num_proc,
               "examples": result["examples"], "examples_this_run": result.get("examples_this_run"),
               "train_seconds": round(result["train_seconds"], 2),
               "examples_per_s": round(result["examples_per_s"], 2), "wall_seconds": round(run["wall"], 1),
               "stages": [{k: s.get(k) for k in ("stage", "name", "loss", "lr", "start_metric", "best_metric", "best_epoch",
                                                 "examples")} for s in result["stages"]],
               "training_pairs": training_pairs(result["stages"], run["manifest"]),
               "interpolation": result.get("interpolation")}
    source_of = {e["stage"]: e.get("source", "mined") for e in run["manifest"]["stages"]}
    for s in pointer["stages"]:
        s["source"] = source_of.get(s["stage"], "mined")
    publish_pointer(models_root(ctx), pointer, cfg)
    for s in pointer["stages"]:
        metric = "n/a" if s["best_metric"] is None else f"{s['best_metric']:.4f}"
        kept = " (no epoch beat the starting weights: stage dropped)" if s.get("best_epoch") == 0 else ""
        print(f"[{name}] stage {s['stage']} {s['name']} ({s['loss']}): best dev NDCG@10 {metric}{kept}")
    if pointer["interpolation"]:
        chosen = pointer["interpolation"]
        tried = ", ".join(f"{a}: {m:.4f}" for a, m in chosen["dev"].items())
        print(f"[{name}] weights {chosen['alpha']:g} of the way from the start to the trained model "
              f"(dev NDCG@10 by fraction: {tried})")
    print(f"[{name}] {result['examples']} examples in {result['train_seconds']:.1f}s of training "
          f"({result['examples_per_s']:.1f} examples/s, {run['launcher']} x{cfg.num_proc}); model: {final}")
    return pointer


def publish_pointer(models: Path, pointer: dict, cfg: TrainConfig) -> list[str]:
    """Write `<variant>.json` (the pointer's variant), and `best.json` when that is `best_variant` (or none is set),
    each by one rename, then remove the model folders no pointer references any more; the names written."""
    variant = pointer["variant"]
    names = [f"{variant}.json"] + (["best.json"] if cfg.best_variant in (None, variant) else [])
    for name in names:
        write_pointer(models / name, pointer)
    prune_models(models)
    return names


def referenced_models(models: Path) -> list[Path]:
    """The model folders the pointers in `models` name (a pointer that cannot be read stops the pruning)."""
    paths = (read_pointer(f).get("path") for f in sorted(models.glob("*.json")))
    return [Path(p) for p in paths if p]


def prune_models(models: Path) -> list[Path]:
    """Remove the model folders under `models/<name>/` that no pointer references and no live run writes."""
    try:
        referenced_models(models)
    except PointerError as exc:
        log.warning("not removing unreferenced models: %s", exc)
        return []
    removed = []
    for folder in sorted(p for p in models.glob("*") if p.is_dir()):
        # model-<tag> folders, and the model/ folder of the older layout
        removed += remove_unreferenced(folder, "model", lambda: referenced_models(models))
    return removed


def run(ctx: JobContext, cfg: TrainConfig) -> dict:
    """One `train` per warehouse at a time: a second waits `lock_wait_s`, then stops naming the holder."""
    with warehouse_lock(ctx.project, "train", wait_s=cfg.lock_wait_s):
        prune_models(models_root(ctx))  # the leftovers of runs killed before they published
        pointer = train_variant(ctx, cfg)
        for baseline in cfg.baselines:
            if baseline == cfg.variant:
                continue
            if not (shards_dir(ctx, cfg) / baseline / MANIFEST).is_file():
                print(f"[{baseline}] baseline skipped: the curriculum published no training set for it "
                      f"(list it in curriculum.variants; a human stage needs the human labels)")
                continue
            # a baseline never becomes models/best.json
            train_variant(ctx, dataclasses.replace(cfg, variant=baseline, best_variant=cfg.best_variant or cfg.variant))
        return pointer


def _published_shards(shards_root: str, variant: str) -> Path:
    """The folder of `variant`'s published training shards; an error naming it when the curriculum wrote none."""
    try:
        return published_shards(shards_root)
    except MissingInputError:
        raise
    except FileNotFoundError as exc:
        raise MissingInputError(f"{exc} (variant {variant!r}: list it in curriculum.variants and run "
                                "`annomine curriculum`)") from exc


def train_variant(ctx: JobContext, cfg: TrainConfig, name: str | None = None) -> dict:
    """Train `cfg.variant` (published as `name`: the variant, or another name for the same training set); its pointer."""
    name = name or cfg.variant
    spec = build_spec(ctx, cfg, name)
    with reading(_published_shards(spec.shards_root, cfg.variant)) as shards:  # no curriculum run removes it meanwhile
        manifest = check_shards(shards)
        dev_dir = shards if (shards / "dev_eval.parquet").is_file() else spec.dev_dir
        return _train_on(ctx, cfg, dataclasses.replace(spec, shards_root=str(shards), dev_dir=str(dev_dir)), manifest, name)


def _train_on(ctx: JobContext, cfg: TrainConfig, spec: TrainSpec, manifest: dict, name: str) -> dict:
    run_dir = _prepare_run_dir(spec, manifest, cfg, name)
    run_id = None
    if cfg.mlflow:
        run_id = _start_tracking(ctx, cfg, run_dir, manifest, name)
        spec.tracking = Tracking(ctx.project.tracking_uri, run_id)
    launcher = cfg.launcher if cfg.launcher != "auto" else ("inprocess" if cfg.num_proc == 1 else "torchrun")
    started = time.time()
    result = launch(launcher, spec, cfg.num_proc)
    return _publish(ctx, cfg, result, {"run_id": run_id, "run_dir": run_dir, "launcher": launcher,
                                       "wall": time.time() - started, "manifest": manifest}, name)


def outcome(pointer: dict) -> str:
    """The pipeline's one-line account of a run: the final model's examples and last kept stage's dev NDCG@10."""
    kept = [s["best_metric"] for s in pointer.get("stages", []) if s.get("best_metric") is not None]
    dev = f", dev NDCG@10 {kept[-1]:.3f}" if kept else ""
    return f"{pointer['variant']}: {pointer.get('examples', 0):,} examples{dev} (baselines beside it: models/)"


def main(argv: list[str] | None = None) -> int:
    return run_job("train", __doc__, TrainConfig, run, argv)


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine train", main))
