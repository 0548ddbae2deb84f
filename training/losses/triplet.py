"""Stage 3: mean max(0, margin - cos(q, p) + cos(q, n)) over (query, positive, negative) rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from annomine.bounds import bounded
from training.losses.base import PairLoss, register


@dataclass
class TripletParams:
    margin: float = bounded(0.3, ge=0)


@register
class TripletLoss(PairLoss):
    name = "triplet"
    Params = TripletParams
    row_format = "triplet"  # pairs whose negative is required

    def __init__(self, params: TripletParams | None = None, **overrides):
        super().__init__(params, **overrides)
        self.margin = float(self.params.margin)

    def loss_on(self, model, batch: dict) -> torch.Tensor:
        q = model.embed(batch["query"], "query")
        return self(q, model.embed(batch["item"], "item"), model.embed(batch["neg"], "item"))

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return F.relu(self.margin - (q * pos).sum(-1) + (q * neg).sum(-1)).mean()
