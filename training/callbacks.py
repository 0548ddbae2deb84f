"""Hooks into the stage runner, passed to `run_stages` / `train_fn` / `launch` (never spec keys).

Every rank calls them. Tests use them to interrupt training at a given step or epoch and to dump each
rank's parameters; a callback that crosses processes (TorchDistributor, Horovod) must pickle.
The trainer they get (`training.runner.StageTrainer`) exposes `run` (`global_step`, `dist`, `out`),
`entry` (the manifest's stage: `stage`, `name`, `loss`), `key` (`stage<k>_<name>`) and `module`
(model + loss)."""

from __future__ import annotations


class Callback:
    def on_step(self, trainer, batch: int) -> None:
        """After batch `batch` (0-based) of an epoch is trained and any batch checkpoint is committed."""

    def on_epoch_end(self, trainer, epoch: int) -> None:
        """After epoch `epoch` (1-based) is evaluated and its checkpoint committed on every rank."""


class CallbackList(Callback):
    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def on_step(self, trainer, batch: int) -> None:
        for c in self.callbacks:
            c.on_step(trainer, batch)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        for c in self.callbacks:
            c.on_epoch_end(trainer, epoch)
