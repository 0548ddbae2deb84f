"""Merged variants: one retriever from trained variants by weight arithmetic, kept only where the dev check says so.

Two models fine-tuned from the same start on different data (the curriculum on judge-graded mined pairs, `human`
on the labels a user has) can be combined without training (task arithmetic, Ilharco et al., 2023; model
soups, Wortsman et al., 2022):

    theta = theta_start + sum_i w_i (theta_i - theta_start)

w = (0.5, 0.5) is the average of the two; (1, 1) adds both fine-tunings' moves. The candidates are each
constituent alone (in `of`'s order), then each vector of `weights`; the dev check that keeps or drops the
trainer's stages (the fold's dev queries over the same pool) scores them and the first best wins, so a merge
is kept only when it beats every constituent on dev. It is the third way to use human labels and mined data
together, beside a stage of its own (`human_plus_curriculum`) and a mixed stage (`curriculum_with_human`).
`python -m lab.train_merges --conf <conf> <name>` for a name under the config's `x-lab.merges` merges
(lab/train_merges.py); the result is a variant like the others (models/<name>.json, evaluate's `variants`).

A seed soup (`x-lab.soups`, `SoupSpec`) merges one variant trained several times on the same data with different
training seeds (shard order, dropout): its members are `<variant>` (the configured `train.seed`) and
`<variant>_seed<k>`, trained by the soup's job where missing. With `select: dev` the candidates are each member
alone, then their uniform average, and the dev check picks; with `select: uniform` the uniform average (Wortsman et
al.'s uniform soup) is the model, its dev figure recorded but not used to choose. The members differ only by seed,
so picking one on 19-22 dev queries picks noise: five seeds of the curriculum spread 0.027 on
fold 0's dev check, more than most configuration changes measured there (docs/experiments.md). Each member is also
published, so the report shows the spread of one configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from annomine.two_tower import TwoTower
from training.interpolation import merge


@dataclass
class MergeSpec:
    # trained variants of this fold (models/<variant>.json), fine-tuned from one start (train.init_from unset)
    of: list[str] = field(default_factory=lambda: ["curriculum", "human"])
    # one weight per model of `of`; each vector is a candidate beside the models alone
    weights: list[list[float]] = field(default_factory=lambda: [[0.5, 0.5], [1.0, 1.0]])

    def validate(self) -> None:
        if len(self.of) < 2 or len(set(self.of)) != len(self.of):
            raise ValueError(f"of must name two or more different variants, got {self.of}")
        for w in self.weights:
            if len(w) != len(self.of):
                raise ValueError(f"weights: {w} has {len(w)} weights for {len(self.of)} models ({self.of})")
            if any(float(x) < 0 for x in w):
                raise ValueError(f"weights: {w} has a negative weight")


SOUP_SELECTIONS = ("dev", "uniform")


@dataclass
class SoupSpec:
    of: str = "curriculum"  # the trained variant (curriculum.variants) whose runs are averaged
    seeds: list[int] = field(default_factory=lambda: [13, 14, 15])  # one training per seed (train.seed)
    # "dev": each member alone and the average compete on the dev check; "uniform": the average, no choice
    select: str = "dev"

    def validate(self) -> None:
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be two or more different training seeds, got {self.seeds}")
        if self.select not in SOUP_SELECTIONS:
            raise ValueError(f"select must be one of {list(SOUP_SELECTIONS)}, got {self.select!r}")

    def members(self, default_seed: int) -> list[tuple[str, int]]:
        """(variant name, seed) per member: the variant itself for the configured seed, else `<of>_seed<k>`."""
        return [(self.of if seed == default_seed else f"{self.of}_seed{seed}", int(seed)) for seed in self.seeds]

    def candidates(self) -> list[tuple[float, ...]]:
        """`dev`: each member alone (the first best wins, so the soup must beat every member), then the uniform
        soup; `uniform`: the uniform soup only."""
        n = len(self.seeds)
        uniform = tuple(1.0 / n for _ in range(n))
        return [uniform] if self.select == "uniform" else [*each_alone(n), uniform]


def each_alone(n: int) -> list[tuple[float, ...]]:
    """The weight vectors that keep one of `n` models whole and drop the rest, in order."""
    return [tuple(float(i == j) for j in range(n)) for i in range(n)]


def candidate_weights(spec: MergeSpec) -> list[tuple[float, ...]]:
    """Each model alone, then the configured vectors, without repeats, in that order (the first best wins)."""
    out: list[tuple[float, ...]] = []
    for w in each_alone(len(spec.of)) + [tuple(map(float, v)) for v in spec.weights]:
        if w not in out:
            out.append(w)
    return out


def label(weights: tuple[float, ...], names: list[str]) -> str:
    """'0.5 curriculum + 0.5 human'."""
    return " + ".join(f"{w:.4g} {n}" for w, n in zip(weights, names) if w) or "the start"


def merged_pairs(pointers: list[dict], weights: tuple[float, ...], same_data: bool = False) -> dict[str, int]:
    """Training pairs behind the merged model: those of every constituent with a non-zero weight, added up, or
    (`same_data`: a soup's members, trained on one set of pairs) the most any of them used."""
    used = {"mined": 0, "human": 0}
    for pointer, w in zip(pointers, weights):
        if w:
            for key, n in (pointer.get("training_pairs") or {}).items():
                used[key] = max(used.get(key, 0), int(n)) if same_data else used.get(key, 0) + int(n)
    return used


def start_of(models: list[TwoTower]) -> TwoTower:
    """The weights every model was fine-tuned from: their common base (one clear error when there is none)."""
    if len({(m.base, m.shared) for m in models}) != 1:
        raise ValueError(f"the models were not all fine-tuned from one start with the same towers (bases "
                         f"{[m.base for m in models]}, shared {[m.shared for m in models]}): they cannot be merged")
    first = models[0]
    return TwoTower.from_base(first.base, shared=first.shared, query_max_len=first.query_max_len,
                              item_max_len=first.item_max_len)


def choose(models: list[TwoTower], names: list[str], candidates: list[tuple[float, ...]], evaluate, start=None) -> dict:
    """Score every candidate with `evaluate` (model -> dev NDCG@10); the first best.
    Returns {"weights", "metric", "dev": {label: metric}, "model"}."""
    start = start if start is not None else start_of(models)
    best, dev = None, {}
    for weights in candidates:
        used = [i for i, w in enumerate(weights) if w]
        alone = len(used) == 1 and weights[used[0]] == 1.0
        model = models[used[0]] if alone else merge(start, models, list(weights))
        metric = float(evaluate(model))
        dev[label(weights, names)] = metric
        print(f"[merge] {label(weights, names)}: dev NDCG@10 {metric:.4f}")
        if best is None or metric > best["metric"]:
            best = {"weights": weights, "metric": metric, "model": model}
    return {**best, "dev": dev}
