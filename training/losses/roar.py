"""Optional last stage, ROAR: L = L_contrast + beta * L_align.

L_contrast is the masked in-batch softmax at temperature tau on each query's top-grade item; L_align,
for every query and every pair of consecutive grade groups present in its list (higher grade a, next
lower grade b), is -log sigmoid((mean_{i in a} s_i - mean_{j in b} s_j) / tau): the log odds-ratio
margin of the groups under a Bradley-Terry model with log-odds s / tau, averaged over the group pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from annomine.bounds import bounded
from training.losses.base import ListLoss, false_negative_mask, register


@dataclass
class ROARParams:
    beta: float = 0.1
    tau: float = bounded(0.01, gt=0)
    margin_delta: float | None = bounded(0.1, ge=0) # None disables the false-negative margin mask


@register
class ROARLoss(ListLoss):
    name = "roar"
    Params = ROARParams

    def __init__(self, params: ROARParams | None = None, **overrides):
        super().__init__(params, **overrides)
        self.beta = float(self.params.beta)
        self.tau = float(self.params.tau)
        self.margin_delta = self.params.margin_delta

    def align(self, scores: torch.Tensor, grades: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """scores, grades, valid: [B, K] (each query's own list). Mean over consecutive group pairs."""
        terms = []
        for i in range(scores.size(0)):
            s, g = scores[i][valid[i]], grades[i][valid[i]]
            levels = torch.unique(g, sorted=True).flip(0)  # highest grade first
            for hi, lo in zip(levels[:-1], levels[1:]):
                margin = (s[g == hi].mean() - s[g == lo].mean()) / self.tau
                terms.append(-F.logsigmoid(margin))
        if not terms:
            return scores.sum() * 0.0
        return torch.stack(terms).mean()

    def forward(self, q: torch.Tensor, items: torch.Tensor, grades: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """q: [B, D]; items: [B, K, D] each query's graded list, first item = a top-grade item;
        grades: [B, K] ints; valid: [B, K] bool (padding False)."""
        own = torch.einsum("bd,bkd->bk", q, items)
        top = items[:, 0, :]
        scores = q @ top.T
        target = torch.arange(q.size(0), device=q.device)
        logits = scores / self.tau
        if self.margin_delta is not None:
            logits = logits.masked_fill(false_negative_mask(scores, target, self.margin_delta), float("-inf"))
        contrast = F.cross_entropy(logits, target)
        return contrast + self.beta * self.align(own, grades, valid)
