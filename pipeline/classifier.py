"""The LightningModule: any network of the zoo, trained as a classifier.

Its hyperparameters are plain values (dicts, lists, numbers), so a checkpoint loads with
`weights_only=True` and rebuilds the same network through `build_model`. Inputs are raw
0-255 images (uint8 or float); normalisation with the training split's mean and std is the
first step of `forward`, so a checkpoint needs nothing else to classify images.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.utilities.data import dim_zero_cat

from pipeline.augment import random_flip, random_shift, random_size
from pipeline.config import AugmentConfig, DatasetConfig, OptimizerConfig, SchedulerConfig, validate
from pipeline.models import ModelConfig, Network, build_model
from pipeline.optim import build_optimizer, build_scheduler


def metric_name(text: str) -> str:
    """A class name as MLflow accepts it in a metric key."""
    return re.sub(r"[^\w\-. ]", "_", text)


class TrainingStats(Metric):
    """Epoch mean of the training loss and training accuracy (micro), over all DDP ranks.

    A step only keeps references to its loss, logits and labels; the accuracy is computed
    once, at the epoch's end. Counting every step instead, as MulticlassAccuracy does, costs
    ~0.3 ms of tensor ops per step, over 1% of a LeNet step on 2 CPU cores (`make bench`).
    The epoch's logits take N x classes floats: 2.4 MB for MNIST.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("losses", [], dist_reduce_fx="cat")
        self.add_state("logits", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.losses.append(loss.expand(len(labels)))  # the batch mean, once per image
        self.logits.append(logits)
        self.labels.append(labels)

    def compute(self) -> dict[str, torch.Tensor]:
        logits, labels = dim_zero_cat(self.logits), dim_zero_cat(self.labels)
        return {
            "loss_epoch": dim_zero_cat(self.losses).mean(),  # a NaN loss stays NaN
            "acc": multiclass_accuracy(
                logits, labels, logits.shape[1], average="micro", validate_args=False
            ),
        }


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        dataset: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        mean: list[float],
        std: list[float],
        augment: dict[str, Any],
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        # logger=False: the run's params are the whole resolved config, logged once by tracking
        self.save_hyperparameters(logger=False)
        self.dataset_cfg = validate(OmegaConf.create(dataset), DatasetConfig)
        self.augment = validate(OmegaConf.create(augment), AugmentConfig)
        self.optimizer_cfg = validate(OmegaConf.create(optimizer), OptimizerConfig)
        self.scheduler_cfg = validate(OmegaConf.create(scheduler), SchedulerConfig)
        self.network: Network = build_model(
            validate(OmegaConf.create(model), ModelConfig), self.dataset_cfg
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
        classes = len(self.dataset_cfg.classes)
        self.train_stats = TrainingStats()
        self.val_acc = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.test_class_acc = MulticlassAccuracy(classes, average="none", validate_args=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` twice around each hook it calls, ~44 times a step;
        # nn.Module.__setattr__ takes ~4 us for it (isinstance checks through the Parameter and
        # Buffer metaclasses), ~0.15 ms a step: near 1% of LeNet's on 2 CPU cores (`make bench`).
        # It is a string, never a parameter, buffer or module: set it directly.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images.float() - self.mean) / self.std)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, labels = batch
        x = images.float()
        if self.augment.flip:
            x = random_flip(x)
        x = random_shift(x, self.augment.max_shift)
        if self.augment.sizes:
            x = random_size(x, self.augment.sizes)
        logits = self(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        # Metrics are updated every step but handed to self.log only on the steps the loggers
        # write: one self.log call costs ~1 ms, a tenth of LeNet's whole step on a CPU.
        self.train_stats.update(loss.detach(), logits.detach(), labels)
        if self.trainer._logger_connector.should_update_logs:  # Lightning's own test for it
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        if self.trainer.is_last_batch:  # before validation, so epoch-end callbacks see them
            for name, value in self.train_stats.compute().items():
                self.log(f"train/{name}", value, on_step=False, on_epoch=True)
            self.train_stats.reset()
        return loss

    def _log_epoch_metric(self, name: str, metric: Metric) -> None:
        # on_epoch: the loggers get it at the epoch's end, whichever step logged it
        self.log(name, metric.compute(), on_step=False, on_epoch=True, prog_bar=name == "val/acc")
        metric.reset()

    def _evaluate(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val")
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.val_acc.update(self._evaluate("val", batch), batch[1])

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metric("val/acc", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        logits = self._evaluate("test", batch)
        self.test_acc.update(logits, batch[1])
        self.test_class_acc.update(logits, batch[1])

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metric("test/acc", self.test_acc)
        per_class = self.test_class_acc.compute()
        for name, accuracy in zip(self.dataset_cfg.classes, per_class, strict=True):
            self.log(f"test/acc_class/{metric_name(name)}", accuracy)
        self.test_class_acc.reset()

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.parameters(), self.optimizer_cfg)
        scheduler = build_scheduler(
            optimizer,
            self.scheduler_cfg,
            epochs=self.trainer.max_epochs or 1,
            total_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer
