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

A `train.variant` named under `train.merges` is not trained: its trained constituents are merged by weight
arithmetic and the dev check picks the weights (training.merging); the outputs are the same. One named under
`train.soups` trains its variant once per seed (members `<variant>_seed<k>`, each published like a variant;
the configured `train.seed`'s member is the variant itself, reused when its pointer has that seed), then
merges the members the same way (each alone, then their average; `select: uniform`: the average only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from annomine.bounds import bounded
from annomine.curriculum import VARIANTS
from annomine.errors import MissingInputError
from annomine.locks import warehouse_lock
from annomine.publish import PointerError, note_write, read_pointer, reading, remove_unreferenced, run_folder, write_pointer
from annomine.runtime import JobContext, run_job
from training.interpolation import check_alphas
from training.launchers import LAUNCHERS, launch
from training.losses import REGISTRY as LOSS_REGISTRY
from training import merging
from training.merging import MergeSpec, SoupSpec
from training.shards import check_shards, published_shards
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
    # Merged variants (training.merging): name -> the trained variants it combines and the weights to try.
    merges: dict[str, MergeSpec] = field(default_factory=dict)
    # Seed soups (training.merging): name -> the variant trained once per seed and the seeds.
    soups: dict[str, SoupSpec] = field(default_factory=dict)

    def validate(self) -> None:
        names = [*VARIANTS, *self.merges, *self.soups]
        if self.variant not in names:
            raise ValueError(f"variant must be one of {names}, got {self.variant!r}")
        if self.best_variant is not None and self.best_variant not in names:
            raise ValueError(f"best_variant must be one of {names} (or empty), got {self.best_variant!r}")
        for name, merge in self.merges.items():
            if name in VARIANTS or name == "best":
                raise ValueError(f"merges.{name}: the name of a trained variant (or 'best'); give the merge its own")
            bad = [v for v in merge.of if v not in VARIANTS]
            if bad:
                raise ValueError(f"merges.{name}.of: {bad} not trained variants; use some of {list(VARIANTS)}")
        for name, soup in self.soups.items():
            if name in VARIANTS or name in self.merges or name == "best":
                raise ValueError(f"soups.{name}: the name of a variant, a merge or 'best'; give the soup its own")
            if soup.of not in VARIANTS:
                raise ValueError(f"soups.{name}.of: {soup.of!r} is not a trained variant; use one of {list(VARIANTS)}")
        if self.launcher not in ("auto", *LAUNCHERS):
            raise ValueError(f"launcher must be auto or one of {list(LAUNCHERS)}, got {self.launcher!r}")
        check_alphas(self.interpolate_alphas)
        unknown = set(self.lr_by_loss) - set(LOSS_REGISTRY)
        if unknown:
            raise ValueError(f"lr_by_loss: unknown loss {sorted(unknown)}; use one of {list(LOSS_REGISTRY)}")


CONFIG_CLASS = TrainConfig


MODEL_PREFIX = "model-"  # models/<name>/model-<tag>/: one folder per published model


def models_root(ctx: JobContext) -> Path:
    return ctx.project.outputs_path / "models"


def build_spec(ctx: JobContext, cfg: TrainConfig, name: str | None = None) -> TrainSpec:
    """The spec every rank receives: the config's training settings, placed in this warehouse. It trains
    `cfg.variant`'s shards into models/<name>/run (name: the variant, or a soup's member)."""
    shards = Path(cfg.shards_dir).expanduser().resolve() if cfg.shards_dir else ctx.project.outputs_path / "shards"
    losses = {f.name: getattr(cfg.losses, f.name) for f in dataclasses.fields(cfg.losses)}
    return TrainSpec.of(cfg, shards_root=str(shards / cfg.variant), dev_dir=str(shards),
                        output_dir=str(models_root(ctx) / (name or cfg.variant) / "run"), min_grade=ctx.project.min_grade,
                        losses=losses)


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
        if cfg.variant in cfg.merges:
            return _merge(ctx, cfg)
        return _soup(ctx, cfg) if cfg.variant in cfg.soups else _train(ctx, cfg)


def _published_shards(shards_root: str, variant: str) -> Path:
    """The folder of `variant`'s published training shards; an error naming it when the curriculum wrote none."""
    try:
        return published_shards(shards_root)
    except MissingInputError:
        raise
    except FileNotFoundError as exc:
        raise MissingInputError(f"{exc} (variant {variant!r}: list it in curriculum.variants and run "
                                "`annomine curriculum`)") from exc


def _train(ctx: JobContext, cfg: TrainConfig, name: str | None = None) -> dict:
    """Train `cfg.variant` (published as `name`: the variant, or a soup's member); its pointer."""
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


def _merge(ctx: JobContext, cfg: TrainConfig) -> dict:
    """`train.variant` names a merge: its constituents' final models combined, the weights chosen on dev."""
    spec = cfg.merges[cfg.variant]
    pointers = []
    for variant in spec.of:
        pointer = _read_pointer(ctx, variant)
        if pointer is None:
            raise MissingInputError(f"{models_root(ctx) / f'{variant}.json'}: merge {cfg.variant!r} needs variant "
                                    f"{variant!r} trained in this fold first (`annomine train --set train.variant={variant}`)")
        pointers.append(pointer)
    return _combine(ctx, cfg, spec.of, pointers, merging.candidate_weights(spec), dataclasses.asdict(spec))


def _read_pointer(ctx: JobContext, variant: str) -> dict | None:
    """models/<variant>.json of this fold, its path resolved; None when absent, one clear error when unreadable."""
    file = models_root(ctx) / f"{variant}.json"
    if not file.is_file():
        return None
    return read_pointer(file, rerun=f"train {variant!r} again")


def _soup(ctx: JobContext, cfg: TrainConfig) -> dict:
    """`train.variant` names a seed soup: its variant trained once per seed (a member whose pointer already has its
    seed is reused), then the members merged like a merge's constituents."""
    soup = cfg.soups[cfg.variant]
    members = soup.members(cfg.seed)
    _check_dev(ctx, cfg)  # before hours of training, not after
    pointers = []
    for i, (name, seed) in enumerate(members, 1):
        pointer = _read_pointer(ctx, name)
        if pointer is not None and pointer.get("seed") == seed and pointer.get("trained", soup.of) == soup.of:
            print(f"[{cfg.variant}] member {i}/{len(members)} {name} (seed {seed}): trained already, reused")
        else:
            print(f"[{cfg.variant}] member {i}/{len(members)} {name}: training {soup.of} with seed {seed}")
            pointer = _train(ctx, dataclasses.replace(cfg, variant=soup.of, seed=seed), name)
        pointers.append(pointer)
    names = [name for name, _ in members]
    return _combine(ctx, cfg, names, pointers, soup.candidates(), dataclasses.asdict(soup), same_data=True)


def _check_dev(ctx: JobContext, cfg: TrainConfig) -> Path:
    dev_dir = Path(build_spec(ctx, cfg).dev_dir)
    if not (dev_dir / "dev_eval.parquet").is_file():
        raise MissingInputError(f"{dev_dir / 'dev_eval.parquet'}: no dev check for this fold; run `annomine curriculum`")
    return dev_dir


def _combine(ctx: JobContext, cfg: TrainConfig, names: list[str], pointers: list[dict],
             candidates: list[tuple[float, ...]], params: dict, same_data: bool = False) -> dict:
    """The models of `pointers` merged at each candidate weight vector, the first best on the fold's dev check
    published as `cfg.variant` (model, pointer, MLflow run). `same_data`: the models trained on the same pairs
    (a soup's members), so the merge used those pairs once."""
    from annomine.two_tower import TwoTower
    from training.runner import DevSet

    models = models_root(ctx)
    dev_dir = _check_dev(ctx, cfg)
    dev = DevSet(dev_dir, ctx.project.min_grade, cfg.dev_max_queries)
    started = time.time()
    print(f"[{cfg.variant}] merging {', '.join(names)}: {len(candidates)} candidates on {len(dev)} dev queries")
    chosen = merging.choose([TwoTower.load(p["path"]) for p in pointers], names, candidates, dev.evaluate)
    with run_folder(models / cfg.variant, MODEL_PREFIX) as final:
        chosen["model"].save(final)
        record = {"of": names, "weights": list(chosen["weights"]), "dev": chosen["dev"], "dev_metric": chosen["metric"],
                  "paths": [os.path.relpath(p["path"], models) for p in pointers]}
        return _publish_merge(ctx, cfg, names, pointers, chosen, record, params, same_data, final, started)


def _publish_merge(ctx: JobContext, cfg: TrainConfig, names: list[str], pointers: list[dict], chosen: dict, record: dict,
                   params: dict, same_data: bool, final: Path, started: float) -> dict:
    models = models_root(ctx)
    run_id = model_uri = None
    if cfg.mlflow:
        run_id, model_uri = _track_merge(ctx, cfg, final, record, params)
    pointer = {"path": str(final), "variant": cfg.variant, "mlflow_run_id": run_id, "model_uri": model_uri,
               "base_model": cfg.base_model, "merge": record, "stages": [],
               "training_pairs": merging.merged_pairs(pointers, chosen["weights"], same_data),
               "wall_seconds": round(time.time() - started, 1)}
    publish_pointer(models, pointer, cfg)
    print(f"[{cfg.variant}] = {merging.label(chosen['weights'], names)} (dev NDCG@10 {chosen['metric']:.4f}); model: {final}")
    return pointer


def _track_merge(ctx: JobContext, cfg: TrainConfig, final: Path, record: dict, params: dict) -> tuple[str, str]:
    """An MLflow run with every candidate's dev figure and the merged model; (run id, model URI)."""
    import mlflow

    from annomine.tracking import artifact_root
    from training.tracking import log_model, start_run

    params = {"train": {"variant": cfg.variant, "merge": params},
              "project": {"seed": ctx.project.seed, "name": ctx.project.name, "fold": ctx.project.fold}}
    run_id = start_run(ctx.project.tracking_uri, ctx.project.mlflow_experiment, f"train-{cfg.variant}", params, None,
                       artifact_root(ctx.project))
    mlflow.set_tracking_uri(ctx.project.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"final_dev_ndcg10": record["dev_metric"],
                            **{f"dev_ndcg10_candidate_{i}": m for i, m in enumerate(record["dev"].values())}})
        mlflow.log_dict(record, "merge.json")
    return run_id, log_model(ctx.project.tracking_uri, run_id, final)


def main(argv: list[str] | None = None) -> int:
    return run_job("train", __doc__, TrainConfig, run, argv)


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine train", main))
