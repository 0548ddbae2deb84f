"""Merged variants and seed soups (lab/merging.py): one retriever from trained variants by weight arithmetic,
published like a trained variant (models/<name>.json, evaluate's `variants`).

    python -m lab.train_merges --conf lab/conf/crowdflower.yaml curriculum_merged_human
    python -m lab.train_merges --conf lab/conf/crowdflower.yaml --set project.fold=1 curriculum_soup_uniform

The names come from the config's `x-lab` section (a key the product ignores): `merges` (name -> the trained
variants it combines and the weights to try) and `soups` (name -> the variant trained once per seed, members
`<variant>_seed<k>`, each published like a variant; the configured `train.seed`'s member is the variant itself,
reused when its pointer has that seed). The `train` section gives the training settings (jobs/train.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from annomine.config import ConfigError, load_job_config
from annomine.errors import MissingInputError
from annomine.locks import warehouse_lock
from annomine.publish import read_pointer, run_folder
from annomine.runtime import JobContext, job_parser, open_context, setup_logging
from jobs.train import MODEL_PREFIX, TrainConfig, build_spec, models_root, prune_models, publish_pointer, train_variant
from lab import merging
from lab.merging import MergeSpec, SoupSpec

SECTION = "x-lab"


@dataclass
class LabConfig:
    """The lab's section: merges and seed soups by name."""

    merges: dict[str, MergeSpec] = field(default_factory=dict)
    soups: dict[str, SoupSpec] = field(default_factory=dict)

    def validate(self) -> None:
        for name, merge in self.merges.items():
            if name in merge.of or name == "best":
                raise ValueError(f"merges.{name}: the name of one of its variants (or 'best'); give the merge its own")
        for name, soup in self.soups.items():
            if name == soup.of or name in self.merges or name == "best":
                raise ValueError(f"soups.{name}: the name of a variant, a merge or 'best'; give the soup its own")

    def check_name(self, name: str) -> None:
        if name not in self.merges and name not in self.soups:
            raise ValueError(f"{name!r} is neither a merge nor a soup of {SECTION}; known: {[*self.merges, *self.soups]}")


def run(ctx: JobContext, cfg: TrainConfig, lab: LabConfig, name: str) -> dict:
    """Merge or soup `name` in this warehouse (one `train` at a time, like the product's); its pointer."""
    lab.check_name(name)
    cfg = dataclasses.replace(cfg, variant=name, baselines=[])
    with warehouse_lock(ctx.project, "train", wait_s=cfg.lock_wait_s):
        prune_models(models_root(ctx))
        return _merge(ctx, cfg, lab.merges[name]) if name in lab.merges else _soup(ctx, cfg, lab.soups[name])


def _merge(ctx: JobContext, cfg: TrainConfig, spec: MergeSpec) -> dict:
    """`cfg.variant` names a merge: its constituents' final models combined, the weights chosen on dev."""
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


def _soup(ctx: JobContext, cfg: TrainConfig, soup: SoupSpec) -> dict:
    """`cfg.variant` names a seed soup: its variant trained once per seed (a member whose pointer already has its
    seed is reused), then the members merged like a merge's constituents."""
    members = soup.members(cfg.seed)
    _check_dev(ctx, cfg)  # before hours of training, not after
    pointers = []
    for i, (name, seed) in enumerate(members, 1):
        pointer = _read_pointer(ctx, name)
        if pointer is not None and pointer.get("seed") == seed and pointer.get("trained", soup.of) == soup.of:
            print(f"[{cfg.variant}] member {i}/{len(members)} {name} (seed {seed}): trained already, reused")
        else:
            print(f"[{cfg.variant}] member {i}/{len(members)} {name}: training {soup.of} with seed {seed}")
            pointer = train_variant(ctx, dataclasses.replace(cfg, variant=soup.of, seed=seed), name)
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
    setup_logging()
    parser = job_parser("python -m lab.train_merges", __doc__)
    parser.add_argument("name", help=f"a merge or soup of the config's {SECTION} section")
    args = parser.parse_args(argv)
    project, cfg = load_job_config(args.conf, "train", TrainConfig, args.overrides)
    _, lab = load_job_config(args.conf, SECTION, LabConfig, args.overrides)
    try:
        lab.check_name(args.name)
    except ValueError as exc:
        raise ConfigError(f"{args.conf}:{SECTION}: {exc}") from exc
    run(open_context(project), cfg, lab, args.name)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("python -m lab.train_merges", main))
