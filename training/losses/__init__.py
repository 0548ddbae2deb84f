"""Training losses of the curriculum: one module per loss, each owning its params, row format, batch
collation and forward (`training.losses.base`), found by name in `REGISTRY`.

Adding a loss: a module here with a `@register`ed subclass of `PointwiseLoss`, `PairLoss` or `ListLoss`
(its `name`, `Params` dataclass, `forward`), plus its name on the import line below. For the curriculum
to write rows for it, its name -> row format line in `annomine.curriculum.FORMAT_OF_LOSS` too (core
stays torch-free, so the format is stated there and checked here). It is then configurable as
`train.losses.<name>.<param>` (jobs/train.py builds `LossesConfig` from this registry).
"""

from __future__ import annotations

from annomine.curriculum import FORMAT_OF_LOSS
from training.losses import bce, mnr, roar, triplet  # noqa: F401 - the built-in losses register on import
from training.losses.base import (REGISTRY, ListLoss, Loss, PairLoss, PointwiseLoss, build_loss, false_negative_mask,
                                  loss_class, register)
from training.losses.bce import BCELoss, BCEParams
from training.losses.mnr import MNRLoss, MNRParams
from training.losses.roar import ROARLoss, ROARParams
from training.losses.triplet import TripletLoss, TripletParams

_unregistered = sorted(set(FORMAT_OF_LOSS) - set(REGISTRY))
if _unregistered:  # every loss the curriculum can write rows for must be trainable
    raise ImportError(f"annomine.curriculum.FORMAT_OF_LOSS names loss(es) {_unregistered} that no "
                      "training.losses module registers")

__all__ = ["REGISTRY", "BCELoss", "BCEParams", "ListLoss", "Loss", "MNRLoss", "MNRParams", "PairLoss",
           "PointwiseLoss", "ROARLoss", "ROARParams", "TripletLoss", "TripletParams", "build_loss",
           "false_negative_mask", "loss_class", "register"]
