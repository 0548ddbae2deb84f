"""The loss interface, the three row formats' batch code, and the registry of losses by name.

A loss (like a sentence-transformers loss) owns everything that is specific to it:

- `name`: how a curriculum stage (`StageDef.loss`, the shard manifest) names it;
- `Params`: its hyperparameters, a dataclass whose defaults are the only ones (`train.losses.<name>`
  in the config nests it; `TrainSpec.losses` carries it to every rank);
- `row_format`, `columns`, `collate(rows, model)`: the shard rows it trains on (`annomine.curriculum`
  writes them; the format must match core's `FORMAT_OF_LOSS`) and how they become token tensors; one of
  the format bases below (`PointwiseLoss`, `PairLoss`, `ListLoss`) provides them;
- `loss_on(model, batch)`: the scalar loss of a collated batch, embedding through the model;
  `forward(...)` is the math on L2-normalised embeddings (cosine = dot product);
- `step_metrics()`: extra numbers logged with each training step (default none).

`register` adds a loss class to `REGISTRY`; `build_loss(name, params)` makes one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from annomine.curriculum import FORMAT_OF_LOSS, ROW_FORMATS


def false_negative_mask(scores: torch.Tensor, positive_index: torch.Tensor, delta: float) -> torch.Tensor:
    """Boolean [B, N] mask, True where candidate j must be dropped for query i.

    scores: [B, N] cosine similarities; positive_index: [B] column of each query's positive.
    A candidate is masked when its score exceeds the positive's by more than `delta`; the
    positive itself is never masked. Computed without gradient (a selection, not a signal).
    """
    with torch.no_grad():
        pos = scores.gather(1, positive_index.view(-1, 1))
        mask = scores > pos + delta
        mask[torch.arange(scores.size(0), device=scores.device), positive_index] = False
    return mask


class Loss(nn.Module):
    """Base of every training loss; `Loss(params)` or `Loss(**overrides)` of its `Params` defaults."""

    name: ClassVar[str]
    Params: ClassVar[type]
    row_format: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]

    def __init__(self, params: Any = None, **overrides):
        super().__init__()
        if params is None:
            params = self.Params()
        elif isinstance(params, dict):
            params = self.Params(**params)
        self.params = dataclasses.replace(params, **overrides) if overrides else params

    def collate(self, rows: list[dict], model) -> dict:
        raise NotImplementedError

    def loss_on(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def step_metrics(self) -> dict[str, float]:
        return {}


def _query_tokens(rows: list[dict], model) -> dict:
    return {"query": model.tokenize([r["query"] or "" for r in rows], "query")}


class PointwiseLoss(Loss):
    """Rows of (query, item, 0/1 label): batch {query, item, label}; `forward(q, d, labels)`."""

    row_format = "pointwise"
    columns = ("query", "item_text", "label")

    def collate(self, rows: list[dict], model) -> dict:
        batch = _query_tokens(rows, model)
        batch["item"] = model.tokenize([r["item_text"] or "" for r in rows], "item")
        batch["label"] = torch.tensor([float(r["label"]) for r in rows])
        return batch

    def loss_on(self, model, batch: dict) -> torch.Tensor:
        q = model.embed(batch["query"], "query")
        return self(q, model.embed(batch["item"], "item"), batch["label"])


class PairLoss(Loss):
    """Rows of (query, positive item, a negative where the row has one): batch {query, item, neg}, where
    `neg` holds the negatives present (None when there are none); `forward(q, pos, neg)`."""

    row_format = "pair"
    columns = ("query", "item_text", "neg_text")

    def collate(self, rows: list[dict], model) -> dict:
        batch = _query_tokens(rows, model)
        batch["item"] = model.tokenize([r["item_text"] or "" for r in rows], "item")
        negs = [r["neg_text"] for r in rows if r.get("neg_text") is not None]
        batch["neg"] = model.tokenize(negs, "item") if negs else None
        return batch

    def loss_on(self, model, batch: dict) -> torch.Tensor:
        q = model.embed(batch["query"], "query")
        neg = model.embed(batch["neg"], "item") if batch.get("neg") is not None else None
        return self(q, model.embed(batch["item"], "item"), neg)


class ListLoss(Loss):
    """Rows of (query, its graded items, top grade first): batch {query, group, grades, valid}, padded to
    the longest list; `forward(q, items [B, K, D], grades [B, K], valid [B, K])`."""

    row_format = "list"
    columns = ("query", "group_texts", "group_grades")

    def collate(self, rows: list[dict], model) -> dict:
        batch = _query_tokens(rows, model)
        k = max(len(r["group_texts"]) for r in rows)
        texts, grades, valid = [], torch.zeros(len(rows), k, dtype=torch.long), torch.zeros(len(rows), k, dtype=torch.bool)
        for i, r in enumerate(rows):
            g = list(r["group_texts"])
            texts += g + [""] * (k - len(g))
            grades[i, :len(g)] = torch.tensor(list(r["group_grades"]), dtype=torch.long)
            valid[i, :len(g)] = True
        batch.update(group=model.tokenize(texts, "item"), grades=grades, valid=valid)
        return batch

    def loss_on(self, model, batch: dict) -> torch.Tensor:
        q = model.embed(batch["query"], "query")
        items = model.embed(batch["group"], "item").view(q.size(0), batch["grades"].size(1), -1)
        return self(q, items, batch["grades"], batch["valid"])


REGISTRY: dict[str, type[Loss]] = {}


def register(cls: type[Loss]) -> type[Loss]:
    """Class decorator: add a loss to `REGISTRY` under its `name`, checking its declaration."""
    for attr in ("name", "Params", "row_format", "columns"):
        if not hasattr(cls, attr):
            raise TypeError(f"loss {cls.__name__} does not declare `{attr}`")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"loss {cls.name!r}: Params must be a dataclass")
    if cls.row_format not in ROW_FORMATS:
        raise TypeError(f"loss {cls.name!r}: row_format {cls.row_format!r} is not one of {list(ROW_FORMATS)}")
    core = FORMAT_OF_LOSS.get(cls.name)
    if core is not None and core != cls.row_format:
        raise TypeError(f"loss {cls.name!r} trains on {cls.row_format!r} rows but the curriculum "
                        f"(annomine.curriculum.FORMAT_OF_LOSS) writes {core!r} rows for it")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"a loss named {cls.name!r} is already registered ({REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    return cls


def loss_class(name: str) -> type[Loss]:
    if name not in REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def build_loss(name: str, params: Any = None) -> Loss:
    """The loss `name` with `params` (its Params dataclass, a dict of them, or None: the defaults)."""
    return loss_class(name)(params)
