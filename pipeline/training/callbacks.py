"""Callbacks of trainings besides Lightning's own: divergence stop, a search's pruning, and the
progress bar."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from pipeline.search.study import StudyTrial


class StopOnDivergence(L.Callback):
    """Stops fitting, on every rank at once, after an epoch whose training loss is not finite."""

    def __init__(self) -> None:
        self.epoch: int | None = None  # the epoch that diverged
        self.first_epoch = 0  # the first this fit ran: a resumed one's is past 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        bad = loss is not None and not bool(torch.isfinite(loss).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.epoch = trainer.current_epoch
            trainer.should_stop = True


class PruneOnReport(L.Callback):
    """Reports the monitored metric to the study trial after every validation (rank 0 only),
    and stops fitting on every rank at once when the study's pruner says so."""

    def __init__(self, trial: StudyTrial) -> None:
        self.trial = trial
        self.epoch: int | None = None  # the epoch after which it was pruned

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.logger is not None:
            self.trial.record_run(trainer.logger.run_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        pruned = False
        value = trainer.callback_metrics.get(self.trial.monitor)
        if trainer.is_global_zero and value is not None:
            pruned = self.trial.report(float(value), trainer.current_epoch)
        if trainer.strategy.reduce_boolean_decision(pruned, all=False):
            self.epoch = trainer.current_epoch
            trainer.should_stop = True


class ProgressBar(RichProgressBar):
    """Rich's bar, its training counter and metrics updated only as often as it redraws.

    Lightning's RichProgressBar updates its task and reads every logged metric after each
    batch, though it draws only `refresh_rate` times a second, from its own thread; at
    Lightning's default of 100 a second that thread costs a CPU training noticeably (`make
    bench`), and 4 a second is enough to read.
    """

    def __init__(self, refresh_rate: int = 4) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.next_update = 0.0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.monotonic()
        if now >= self.next_update or trainer.is_last_batch:
            self.next_update = now + 1 / self.refresh_rate
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
