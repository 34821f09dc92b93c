"""Callbacks of every training: divergence stop, and cheaper variants of Lightning's own."""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar


class StopOnDivergence(L.Callback):
    """Stops fitting, on every rank at once, after an epoch whose training loss is not finite."""

    def __init__(self) -> None:
        self.epoch: int | None = None  # the epoch that diverged

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        bad = loss is not None and not bool(torch.isfinite(loss).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.epoch = trainer.current_epoch
            trainer.should_stop = True


class ProgressBar(RichProgressBar):
    """Rich's bar, its training counter and metrics updated only as often as it redraws.

    Lightning's RichProgressBar updates its task and reads every logged metric after each
    batch, ~0.25 ms (over 1% of a LeNet step on 2 CPU cores, `make bench`), though it draws
    only `refresh_rate` times a second, from its own thread: 4 a second is enough to read, and
    that thread takes ~5% of a CPU training at Lightning's default of 100.
    """

    def __init__(self, refresh_rate: int = 4) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._next_update = 0.0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.monotonic()
        if now >= self._next_update or trainer.is_last_batch:
            self._next_update = now + 1 / self.refresh_rate
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class FixedStateKey:
    """Mixin for Lightning callbacks whose state key is a repr of their settings: built once.

    Lightning formats every callback's key into a label on each hook call, even with profiling
    off, and a repr takes ~3.6 us: 12 times a step for the training's two checkpoints (~0.2%
    of a LeNet step on 2 CPU cores, `make bench`). The settings are fixed at construction.
    """

    @cached_property
    def state_key(self) -> str:
        return super().state_key  # type: ignore[misc]


class CachedKeyCheckpoint(FixedStateKey, ModelCheckpoint):
    pass


class CachedKeyEarlyStopping(FixedStateKey, EarlyStopping):
    pass
