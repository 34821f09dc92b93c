"""`build_model`: the one path from config to network, for training, summary and tests;
`build_classifier`: the one path from a trained model's saved hyperparameters back to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import DatasetConfig, ModelConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.models.backbones import backbone_entry
from pipeline.models.geometry import InputTooSmallError, Shape, min_input_size, output_shape
from pipeline.models.heads import HEADS


class InputShapeError(PipelineError, ValueError):
    """A batch whose image shape the network cannot take (says which shape it can)."""


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


class Network(nn.Module):
    """A backbone's named blocks, then a head's, behind a check of the input shape.

    `expected_input` is the (C, H, W) it was built for (the dataset's images); an fc head
    accepts only that, GAP and SPP heads any H, W from `min_input_size` up. `hparams` holds
    the resolved config as plain values, for logging and for rebuilding.
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Sequential,
        head: nn.Sequential,
        expected_input: Shape,
        fixed_size: bool,
        min_input_size: int,
        hparams: dict[str, Any],
    ) -> None:
        super().__init__()
        self.name = name
        self.backbone, self.head = backbone, head
        self.expected_input = expected_input
        self.fixed_size = fixed_size
        self.min_input_size = min_input_size
        self.hparams = hparams

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(tuple(x.shape))
        return self.head(self.backbone(x))

    def check_input(self, shape: Shape) -> None:
        """Raise an InputShapeError naming what this network takes, before torch fails deeper."""
        channels = self.expected_input[0]
        if len(shape) != 4:
            raise InputShapeError(f"{self.name} takes a batch N x C x H x W, got shape {shape}")
        if self.fixed_size and shape[1:] != self.expected_input:
            raise InputShapeError(
                f"{self.name} expects {_fmt(self.expected_input)} input (its training size), "
                f"got {_fmt(shape[1:])}; use head=gap or head=spp for other sizes, or resize"
            )
        if shape[1] != channels:
            raise InputShapeError(
                f"{self.name} expects {channels}-channel input, got {_fmt(shape[1:])}"
            )
        side = self.min_input_size
        if min(shape[2:]) < side:
            raise InputShapeError(
                f"{self.name} needs inputs of at least {channels}x{side}x{side} (smaller maps "
                f"vanish before its head), got {_fmt(shape[1:])}"
            )

    def layers(self) -> list[tuple[str, nn.Module]]:
        """The named blocks in forward order: the rows of the architecture summary. A backbone
        that is not a sequence of blocks (a user's own) is one row, under its class name."""
        if isinstance(self.backbone, nn.Sequential):
            blocks = list(self.backbone.named_children())
        else:
            blocks = [(type(self.backbone).__name__, self.backbone)]
        return [*blocks, *self.head.named_children()]

    def first_conv(self) -> nn.Conv2d:
        """The layer whose kernels face the image (learned or a classical bank), for plots."""
        return next(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d))


class ImageClassifier(nn.Module):
    """A network behind its training split's normalisation: raw 0-255 images (uint8 or float)
    in, class scores out, so a trained model needs nothing else to classify images. Lightning's
    module trains one; evaluation restores one from a checkpoint without Lightning."""

    def __init__(
        self,
        network: Network,
        dataset_cfg: DatasetConfig,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.network = network
        self.dataset_cfg = dataset_cfg
        # from the data's meta.json (kept in the checkpoint's hyperparameters), not the weights
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def forward(self, images: Tensor) -> Tensor:
        return self.network((images.float() - self.mean) / self.std)


def build_model(model: ModelConfig, dataset: DatasetConfig) -> Network:
    """The network `model` names, for the dataset's image shape and class count."""
    shape, num_classes = dataset.shape, len(dataset.classes)
    entry, head_entry = backbone_entry(model.backbone), HEADS[model.head]
    defaults = entry.defaults(model, shape)
    resolved = replace(model, **{k: v for k, v in defaults.items() if getattr(model, k) is None})
    name = f"{model.backbone_name}-{model.head}"

    backbone = entry.build(resolved, shape[0], head_entry.fixed_size)
    try:
        side = min_input_size(backbone, shape[0])
    except InputTooSmallError as err:  # a user's network that runs on no input at all
        raise ConfigError(f"model.backbone: {name} cannot run: {err}") from err
    if min(shape[1:]) < side:
        raise ConfigError(
            f"{name} needs images of at least {side}x{side}, dataset '{dataset.name}' has "
            f"{_fmt(shape[1:])}; pad them (model.input_pad) or choose a model for small images"
            + (" (model.stem=cifar)" if resolved.stem == "imagenet" else "")
        )
    features = output_shape(backbone, shape)
    if not head_entry.fixed_size and len(features) != 3:
        raise ConfigError(
            f"model.head={model.head} pools feature maps (C x H x W), but {name}'s backbone "
            f"gives {_fmt(features)} per image: use model.head=fc, or end your network before "
            "its own pooling"
        )
    head = head_entry.build(resolved, features, num_classes, entry.fc_name)
    hparams = {"name": name, **asdict(resolved), "input_shape": list(shape)}
    hparams["num_classes"] = num_classes
    return Network(name, backbone, head, shape, head_entry.fixed_size, side, hparams)


def build_classifier(
    model: dict[str, Any], dataset: dict[str, Any], mean: Sequence[float], std: Sequence[float]
) -> ImageClassifier:
    """The classifier saved hyperparameters describe (a checkpoint's, a logged model's
    config.json: ModelConfig and DatasetConfig as dicts, the training split's mean and std),
    with fresh weights: training starts from it, evaluation and serving load weights into it."""
    dataset_cfg = DatasetConfig(**dataset)
    return ImageClassifier(build_model(ModelConfig(**model), dataset_cfg), dataset_cfg, mean, std)
