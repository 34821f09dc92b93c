"""The LightningModule: any network of the zoo, trained as a classifier.

Its hyperparameters are plain values (dicts, lists, numbers), so a checkpoint loads with
`weights_only=True` and rebuilds the same network. What it trains is an `ImageClassifier`
(`self.model`): raw 0-255 images in, normalised with the training split's mean and std, so a
checkpoint needs nothing else to classify images, and evaluation restores it without Lightning.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from pipeline.config import (
    AugmentConfig,
    DatasetConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainJob,
    require,
)
from pipeline.data.augment import augment, draw_height, resize_to_height, training_heights
from pipeline.models import build_classifier
from pipeline.training.graphs import GraphedSteps
from pipeline.training.optim import build_optimizer, build_scheduler


def metric_name(text: str) -> str:
    """A class name as MLflow accepts it in a metric key."""
    return re.sub(r"[^\w\-. ]", "_", text)


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        dataset: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        augment: dict[str, Any],
        mean: list[float],
        std: list[float],
        label_smoothing: float = 0.0,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        # logger=False: the run's params are the whole resolved config, logged once by tracking
        self.save_hyperparameters(logger=False)
        self.dataset_cfg = DatasetConfig(**dataset)
        self.augment_cfg = AugmentConfig(**augment)
        self.optimizer_cfg = OptimizerConfig(**optimizer)
        self.scheduler_cfg = SchedulerConfig(**scheduler)
        self.model = build_classifier(model, dataset, mean, std)
        self.train_heights = self._train_heights()
        classes = len(self.dataset_cfg.classes)
        # the training epoch's loss x images and correct answers, added up on the device each
        # step in two in-place adds (metric objects, or one buffer indexed, dispatch several
        # times the operators, and a small network's GPU step is bound by launching them: `make
        # bench`'s operator counts), its images counted on the host; all read once at the
        # epoch's end. A diverged epoch's loss stays NaN, for StopOnDivergence.
        self.register_buffer("train_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("train_correct", torch.zeros((), dtype=torch.long), persistent=False)
        self.train_images = 0
        # trainer.cuda_graph: each step replayed from a CUDA graph, the optimizer and its
        # schedule stepped here (Lightning's manual optimization)
        self.graphed = GraphedSteps(self.graph_step, self) if cuda_graph else None
        self.automatic_optimization = not cuda_graph
        self.val_acc = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.test_class_acc = MulticlassAccuracy(classes, average="none", validate_args=False)

    @classmethod
    def from_config(cls, cfg: TrainJob, meta: dict[str, Any]) -> Classifier:
        """The module for a training config, normalising with the preprocessed data's stats."""
        return cls(
            model=asdict(cfg.model),
            dataset=asdict(cfg.dataset),
            optimizer=asdict(cfg.optimizer),
            scheduler=asdict(cfg.scheduler),
            augment=asdict(cfg.data.augment),
            mean=meta["train_mean"],
            std=meta["train_std"],
            label_smoothing=cfg.train.label_smoothing,
            cuda_graph=cfg.trainer.cuda_graph,
        )

    def _train_heights(self) -> tuple[int, int]:
        """The range of image heights training draws from: the dataset's alone for a network
        of fixed size (fc heads), else `data.augment.scale_range` of it, checked against the
        smallest input the network accepts."""
        height, network = self.dataset_cfg.height, self.model.network
        if network.fixed_size:
            return height, height
        heights = training_heights(height, self.augment_cfg.scale_range)
        side = network.min_input_size
        require(
            heights[0] >= side,
            "data.augment.scale_range",
            self.augment_cfg.scale_range,
            f"a low end of at least {side / height:.3g}: {network.name} takes {side} px up",
        )
        return heights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, labels = batch
        height = draw_height(self.train_heights)
        if self.graphed is not None:
            loss = self._replayed_step(images, labels, height)
        else:
            loss = self.training_loss(images, labels, height)
        self.train_images += len(labels)
        # handed to self.log only on the steps the loggers write (Lightning's own schedule)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            # a copy: a graph's loss is rewritten by its next replay
            self.log(
                "train/loss_step",
                loss.detach().clone(),
                on_step=True,
                on_epoch=False,
                prog_bar=True,
            )
        if self.trainer.is_last_batch:  # before validation, so epoch-end callbacks see them
            self._log_training_epoch()
        return loss

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor, height: int
    ) -> torch.Tensor:
        """The loss of the batch augmented to `height`, added to the epoch's sums with its
        correct answers."""
        logits = self(augment(images.float(), self.augment_cfg, height))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        with torch.no_grad():
            self.train_loss_sum.add_(loss, alpha=len(labels))
            self.train_correct.add_((logits.argmax(dim=1) == labels).sum())
        return loss

    def graph_step(self, images: torch.Tensor, labels: torch.Tensor, height: int) -> torch.Tensor:
        """What a CUDA graph holds (pipeline.training.graphs): the augmented batch's forward
        and backward pass into zeroed gradients, and the epoch's sums. Its own
        autocast, as Lightning's bf16-mixed has it but caching no casts, as graphs need."""
        self.optimizers().optimizer.zero_grad(set_to_none=False)
        bf16 = self.trainer.precision == "bf16-mixed"
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss = self.training_loss(images, labels, height)
        loss.backward()
        return loss

    def _replayed_step(
        self, images: torch.Tensor, labels: torch.Tensor, height: int
    ) -> torch.Tensor:
        """A training step from its CUDA graph, then the optimizer's step and, per step, its
        schedule's (per epoch: on_train_epoch_end)."""
        assert self.graphed is not None
        loss = self.graphed(images, labels, height)
        self.optimizers().step()
        if self.scheduler_interval == "step":
            self.lr_schedulers().step()
        return loss

    @property
    def scheduler_interval(self) -> str | None:
        """When the schedule steps ("step" or "epoch"), as Lightning configured it; None: none."""
        configs = self.trainer.lr_scheduler_configs
        return configs[0].interval if configs else None

    def on_train_epoch_end(self) -> None:
        if self.graphed is not None and self.scheduler_interval == "epoch":
            self.lr_schedulers().step()

    def _log_training_epoch(self) -> None:
        """train/loss_epoch and train/acc over the epoch's images, on every rank."""
        images = self.train_loss_sum.new_tensor(self.train_images)
        sums = torch.stack((self.train_loss_sum, self.train_correct.float(), images))
        loss, correct, images = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self.log("train/loss_epoch", loss / images, on_step=False, on_epoch=True)
        self.log("train/acc", correct / images, on_step=False, on_epoch=True)
        self.train_loss_sum.zero_()
        self.train_correct.zero_()
        self.train_images = 0

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
        """val/acc of a multi-size network: at the dataset's size and the training range's
        ends alike, so that the best checkpoint is the best over the range it serves."""
        images, labels = batch
        self.val_acc.update(self._evaluate("val", batch), labels)
        for height in sorted(set(self.train_heights) - {images.shape[-2]}):
            self.val_acc.update(self(resize_to_height(images, height)), labels)

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
        # beside a CUDA graph, the optimizer's step is one fused kernel
        fused = self.graphed is not None
        optimizer = build_optimizer(self.parameters(), self.optimizer_cfg, fused=fused)
        scheduler = build_scheduler(
            optimizer,
            self.scheduler_cfg,
            epochs=self.trainer.max_epochs or 1,
            total_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer
