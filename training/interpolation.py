"""Weight-space ensembles of the trained model and its starting weights (WiSE-FT, Wortsman et al., 2022).

Fine-tuning a strong zero-shot start on a few thousand noisy pairs moves it far from weights that were good
on queries nobody labelled here. Moving the trained weights back part of the way,

    theta(alpha) = theta_start + alpha * (theta_trained - theta_start),

keeps most of what fine-tuning taught at alpha near 1 and most of the start's breadth near 0; it costs nothing
at inference (one model, the same size). The runner scores each configured alpha with the same dev check that
keeps or drops stages and keeps the best (alpha 1.0, the trained model, wins ties), so the choice is made on dev
like every other and reported in the run's result.

The same arithmetic merges several models fine-tuned from one start (task arithmetic, Ilharco et al., 2023;
model soups, Wortsman et al., 2022): theta = theta_start + sum_i w_i (theta_i - theta_start); the lab's
merged variants (lab/merging.py) score a few weight vectors on the dev check.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from annomine.two_tower import TwoTower

log = logging.getLogger("annomine.train")


def check_alphas(alphas: list[float]) -> None:
    bad = [a for a in alphas if not 0.0 <= float(a) <= 1.0]
    if bad:
        raise ValueError(f"train.interpolate_alphas: {bad[0]} is not a fraction in [0, 1]")


def _check_same_tensors(start: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    if start.keys() != other.keys():
        missing = sorted(set(start) ^ set(other))[:3]
        raise ValueError(f"start and trained weights differ in their tensors (e.g. {missing}): not the same architecture")


def interpolate_state(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float) -> dict:
    """theta_start + alpha (theta_trained - theta_start) for floating tensors; others (ids, buffers) as trained."""
    _check_same_tensors(start, trained)
    return {k: torch.lerp(start[k], v, float(alpha)) if v.is_floating_point() else v for k, v in trained.items()}


def merge_state(start: dict[str, torch.Tensor], trained: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    """theta_start + sum_i w_i (theta_i - theta_start) for floating tensors; others (ids, buffers) as the first."""
    if len(trained) != len(weights) or not trained:
        raise ValueError(f"need one weight per model: {len(trained)} models, {len(weights)} weights")
    for other in trained:
        _check_same_tensors(start, other)
    out = {}
    for k, base in start.items():
        if not base.is_floating_point():
            out[k] = trained[0][k]
            continue
        merged = base.clone()
        for state, w in zip(trained, weights):
            merged += float(w) * (state[k] - base)
        out[k] = merged
    return out


def _towers(model: TwoTower) -> dict[str, torch.nn.Module]:
    return {"query": model.query_encoder} if model.shared else {"query": model.query_encoder, "item": model.item_encoder}


def _with_towers(template: TwoTower, state_of) -> TwoTower:
    """A copy of `template` (its tokenizer and lengths) whose towers hold `state_of(side)`."""
    out = copy.deepcopy(template)
    out._onnx_towers = {}  # its weights change below: no exported graph of the template's weights may serve it
    for side, tower in _towers(out).items():
        tower.load_state_dict(state_of(side))
    return out.eval()


def interpolate(start: TwoTower, trained: TwoTower, alpha: float) -> TwoTower:
    """A new TwoTower (trained's tokenizer and lengths) whose tower weights are theta(alpha)."""
    if start.shared != trained.shared:
        raise ValueError("start and trained models differ in tower sharing")
    return _with_towers(trained, lambda side: interpolate_state(_towers(start)[side].state_dict(),
                                                                _towers(trained)[side].state_dict(), alpha))


def merge(start: TwoTower, models: list[TwoTower], weights: list[float]) -> TwoTower:
    """A new TwoTower (the first model's tokenizer and lengths) whose tower weights are the merge above."""
    if any(m.shared != start.shared for m in models):
        raise ValueError("the models differ in tower sharing")
    return _with_towers(models[0], lambda side: merge_state(_towers(start)[side].state_dict(),
                                                            [_towers(m)[side].state_dict() for m in models], weights))


def choose(start: TwoTower, trained: TwoTower, trained_metric: float, alphas: list[float], evaluate) -> dict:
    """Score theta(alpha) for every alpha < 1 with `evaluate` (model -> dev NDCG@10); the best against the trained
    model's own `trained_metric`. Returns {"alpha", "metric", "dev": {alpha: metric}, "model"}."""
    check_alphas(alphas)
    dev = {1.0: float(trained_metric)}
    best = {"alpha": 1.0, "metric": float(trained_metric), "model": trained}
    for alpha in sorted({float(a) for a in alphas if float(a) < 1.0}, reverse=True):
        model = interpolate(start, trained, alpha)
        metric = float(evaluate(model))
        dev[alpha] = metric
        log.info("weights %.2f of the way from the start to the trained model: dev NDCG@10 %.4f", alpha, metric)
        if metric > best["metric"]:
            best = {"alpha": alpha, "metric": metric, "model": model}
    return {**best, "dev": dict(sorted(dev.items()))}


def interpolate_final(start: TwoTower, trained_dir: str | Path, trained_metric: float, alphas: list[float], evaluate,
                      out_dir: str | Path) -> dict:
    """`choose`, then the chosen model saved to `out_dir`; the record without the model."""
    trained = TwoTower.load(trained_dir)
    chosen = choose(start, trained, trained_metric, alphas, evaluate)
    chosen.pop("model").save(out_dir)
    return chosen
