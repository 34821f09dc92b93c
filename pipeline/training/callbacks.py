"""Callbacks of trainings besides Lightning's own (divergence stop, a search's pruning, the
progress bar, the epoch history) and their logger, which writes into the training's run."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger

from pipeline.search.study import StudyTrial


class RunMetrics(MLFlowLogger):
    """Lightning's MLflow logger, writing each metric into run `run_id` as it is logged; the
    run's owner (pipeline.tracking.runs.TrainingRun) created it and ends it, so `finalize`
    (Lightning's, after fit and test and on an exception) leaves its status alone. Lightning
    logs from rank 0 only: the other ranks' logger has no run (None) and never makes one."""

    def finalize(self, status: str = "success") -> None:
        pass


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


class EpochHistory(L.Callback):
    """Writes history.csv (epoch, losses, accuracies, learning rate, seconds so far), one row
    per epoch on rank 0: the training curves `dvc plots show` draws."""

    columns = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "elapsed_s")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics

        def value(name: str) -> float:
            return float(metrics[name]) if name in metrics else math.nan

        row = {
            "epoch": trainer.current_epoch,
            "train_loss": value("train/loss_epoch"),
            "train_acc": value("train/acc"),
            "val_loss": value("val/loss"),
            "val_acc": value("val/acc"),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "elapsed_s": round(time.monotonic() - self.start, 2),
        }
        fresh = not self.path.exists() or trainer.current_epoch == 0
        with self.path.open("w" if fresh else "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            if fresh:
                writer.writeheader()
            writer.writerow(row)
