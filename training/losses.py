"""Training losses of the curriculum, one small class each, holding its own hyperparameters.

All take L2-normalised embeddings (cosine = dot product) and return a scalar tensor.

- `BCELoss` (stage 1): pointwise binary cross-entropy on logit = t * cos(q, d) + b, with a learnable
  temperature t (initialised at 20) and bias b (initialised at 0; `learn_bias=False` pins it).
- `MNRLoss` (stage 2): multiple-negatives ranking (in-batch softmax at `scale`) over the batch's
  positives and hard negatives, with the ROAR false-negative margin mask: candidate j is dropped for
  query i when cos(q_i, d_j) > cos(q_i, d_i) + delta (a likely unlabelled duplicate of the positive).
- `TripletLoss` (stage 3): mean max(0, margin - cos(q, p) + cos(q, n)), margin 0.3.
- `ROARLoss` (optional last stage): L = L_contrast + beta * L_align. L_contrast is the masked
  in-batch softmax at temperature tau on each query's top-grade item; L_align, for every query and
  every pair of consecutive grade groups present in its list (higher grade a, next lower grade b),
  is -log sigmoid((mean_{i in a} s_i - mean_{j in b} s_j) / tau): the log odds-ratio margin of the
  groups under a Bradley-Terry model with log-odds s / tau, averaged over the group pairs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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


class BCELoss(nn.Module):
    name = "bce"

    def __init__(self, init_temperature: float = 20.0, learn_bias: bool = True):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(float(init_temperature)))
        self.bias = nn.Parameter(torch.tensor(0.0), requires_grad=learn_bias)

    def logits(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.temperature * (q * d).sum(-1) + self.bias

    def forward(self, q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.logits(q, d), labels.float())

    def hparams(self) -> dict:
        return {"init_temperature": float(self.temperature.detach()), "learn_bias": self.bias.requires_grad}


class MNRLoss(nn.Module):
    name = "mnr"

    def __init__(self, scale: float = 20.0, margin_delta: float | None = 0.1):
        super().__init__()
        self.scale = float(scale)
        # None disables the false-negative margin mask.
        self.margin_delta = margin_delta
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

    def hparams(self) -> dict:
        return {"scale": self.scale, "margin_delta": self.margin_delta}


class TripletLoss(nn.Module):
    name = "triplet"

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = float(margin)

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return F.relu(self.margin - (q * pos).sum(-1) + (q * neg).sum(-1)).mean()

    def hparams(self) -> dict:
        return {"margin": self.margin}


class ROARLoss(nn.Module):
    name = "roar"

    def __init__(self, beta: float = 0.1, tau: float = 0.01, margin_delta: float | None = 0.1):
        super().__init__()
        self.beta = float(beta)
        self.tau = float(tau)
        self.margin_delta = margin_delta

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

    def hparams(self) -> dict:
        return {"beta": self.beta, "tau": self.tau, "margin_delta": self.margin_delta}


def build_loss(name: str, params: dict | None = None) -> nn.Module:
    classes = {c.name: c for c in (BCELoss, MNRLoss, TripletLoss, ROARLoss)}
    if name not in classes:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(classes)}")
    return classes[name](**(params or {}))
