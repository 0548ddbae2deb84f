"""Stage 2: multiple-negatives ranking (in-batch softmax at `scale`) over the batch's positives and hard
negatives, with the ROAR false-negative margin mask: candidate j is dropped for query i when
cos(q_i, d_j) > cos(q_i, d_i) + margin_delta (a likely unlabelled duplicate of the positive)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from annomine.bounds import bounded
from training.losses.base import PairLoss, false_negative_mask, register


@dataclass
class MNRParams:
    scale: float = bounded(20.0, gt=0)
    margin_delta: float | None = bounded(0.1, ge=0) # None disables the false-negative margin mask


@register
class MNRLoss(PairLoss):
    name = "mnr"
    Params = MNRParams

    def __init__(self, params: MNRParams | None = None, **overrides):
        super().__init__(params, **overrides)
        self.scale = float(self.params.scale)
        self.margin_delta = self.params.margin_delta
        self.last_masked = 0

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None) -> torch.Tensor:
        """q, pos: [B, D]; neg: [M, D] hard negatives (any number, may be None)."""
        candidates = pos if neg is None or neg.numel() == 0 else torch.cat([pos, neg], dim=0)
        scores = q @ candidates.T
        target = torch.arange(q.size(0), device=q.device)
        logits = scores * self.scale
        if self.margin_delta is not None:
            mask = false_negative_mask(scores, target, self.margin_delta)
            self.last_masked = int(mask.sum())
            logits = logits.masked_fill(mask, float("-inf"))
        return F.cross_entropy(logits, target)

    def step_metrics(self) -> dict[str, float]:
        return {"masked_negatives": self.last_masked}
