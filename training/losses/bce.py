"""Stage 1: pointwise binary cross-entropy on logit = t * cos(q, d) + b, with a learnable temperature t
and bias b (`learn_bias=False` pins b at 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from annomine.bounds import bounded
from training.losses.base import PointwiseLoss, register


@dataclass
class BCEParams:
    init_temperature: float = bounded(20.0, gt=0)
    learn_bias: bool = True


@register
class BCELoss(PointwiseLoss):
    name = "bce"
    Params = BCEParams

    def __init__(self, params: BCEParams | None = None, **overrides):
        super().__init__(params, **overrides)
        self.temperature = nn.Parameter(torch.tensor(float(self.params.init_temperature)))
        self.bias = nn.Parameter(torch.tensor(0.0), requires_grad=self.params.learn_bias)

    def logits(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.temperature * (q * d).sum(-1) + self.bias

    def forward(self, q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.logits(q, d), labels.float())

    def step_metrics(self) -> dict[str, float]:
        return {"bce_temperature": float(self.temperature.detach())}
