"""Backbones: the feature extractors a head classifies.

Two kinds, one interface (`backbone_entry`):
- the zoo's, by name (`model.backbone=alexnet`): one module per family in
  `pipeline/models/zoo/`, each builder registered by `register_backbone` next to it (as
  torchvision's `register_model`). A zoo builder returns an nn.Sequential of named blocks in
  forward order (pad, C1, S2, ... or conv1, norm1, pool1, ...), so the summary prints one row
  per layer under the paper's name;
- a network of the user's own package, named by Hydra's `_target_`
  (`model.backbone={_target_: my_package.MyNet, width: 16}`): any nn.Module from images
  N x C x H x W to feature maps N x C' x H' x W', built by `hydra.utils.instantiate`. The
  heads, summary, checkpoints, logged model and evaluation treat it like the zoo's.

The tail: a zoo backbone's last block may exist only to reach the fixed size of its fully
connected layers: LeNet's C5 (a 5x5 window on S4's 5x5 maps, "a full connection", LeCun et al.
1998) and AlexNet's pool5 (13x13 -> the 6x6 fc6 expects). Only the fc head gets it. SPP takes
the place of the last pooling layer (He et al. 2015) and GAP's class maps the place of C5 (NIN;
Lin et al. 2013), so those heads read the larger maps before the tail.

Also here: the blocks the zoo's builders share (`conv`, `first_conv`, `pool`, `input_pad`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hydra.utils
import torch
from hydra.errors import InstantiationException
from torch import nn

from pipeline.config import ModelConfig, require
from pipeline.errors import ConfigError
from pipeline.models.banks import bank
from pipeline.models.geometry import Shape
from pipeline.models.layers import TrainableSubsampling, activation
from pipeline.registry import Registry

BuildBackbone = Callable[[ModelConfig, int, bool], nn.Module]


@dataclass(frozen=True)
class BackboneEntry:
    # (resolved config, input channels, with the tail?) -> the feature extractor
    build: BuildBackbone
    # the values of the config keys left null, for this config and input shape (C, H, W)
    defaults: Callable[[ModelConfig, Shape], dict[str, Any]]
    # how the fc/spp heads name the fully connected layers, numbered from 6: "F{}" -> F6
    fc_name: str = "fc{}"


BACKBONES: Registry[BackboneEntry] = Registry("backbone")


def register_backbone(
    name: str, defaults: Callable[[ModelConfig, Shape], dict[str, Any]], fc_name: str
) -> Callable[[BuildBackbone], BuildBackbone]:
    """Decorator: the builder of backbone `name` (`model.backbone=name`)."""

    def decorate(build: BuildBackbone) -> BuildBackbone:
        BACKBONES.add(name, BackboneEntry(build, defaults, fc_name))
        return build

    return decorate


def backbone_entry(backbone: str | dict[str, Any]) -> BackboneEntry:
    """How to build `model.backbone`: a zoo name, or a `_target_` the user's package defines.

    Raises a ConfigError naming the key and what is allowed: an unknown name, or a target that
    does not import."""
    if isinstance(backbone, str):
        allowed = f"{', '.join(BACKBONES)}, or {{_target_: your_package.YourNetwork}}"
        require(backbone in BACKBONES, "model.backbone", backbone, allowed)
        return BACKBONES[backbone]
    target = backbone["_target_"]
    module, _, name = target.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"config key 'model.backbone._target_' = {target!r} cannot be imported ({err}): "
            "install your package or put it on PYTHONPATH"
        ) from err
    return BackboneEntry(lambda cfg, channels, tail: instantiated(backbone), plain_defaults)


def instantiated(backbone: dict[str, Any]) -> nn.Module:
    """The user's network, built by Hydra from its `_target_` and the other keys as arguments."""
    try:
        network = hydra.utils.instantiate(backbone)
    except InstantiationException as err:
        raise ConfigError(f"model.backbone: {err}") from err
    if not isinstance(network, nn.Module):
        raise ConfigError(
            f"model.backbone._target_ {backbone['_target_']} built a "
            f"{type(network).__name__}, not a torch.nn.Module"
        )
    return network


def plain_defaults(cfg: ModelConfig, shape: Shape) -> dict[str, Any]:
    """A backbone with no head options of its own (a user's; NiN changes two): relu, its heads
    classify straight from the features (no hidden layer, no dropout)."""
    return {
        "activation": "relu",
        "pooling": "max",
        "input_pad": 0,
        "hidden": [],
        "spp_levels": [4, 2, 1],
        "dropout": 0.0,
    }


def conv(
    cfg: ModelConfig,
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding, groups=groups, padding_mode=cfg.padding_mode)


def first_conv(
    cfg: ModelConfig, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0
) -> nn.Conv2d:
    """The first layer: learned, or a frozen classical bank (weights fixed, bias 0, no grads).

    With several input channels each kernel is applied to the channel mean."""
    layer = conv(cfg, cin, cout, k, stride, padding)
    if cfg.first_layer != "learned":
        with torch.no_grad():
            layer.weight.copy_(bank(cfg.first_layer, cout, k)[:, None] / cin)
            layer.bias.zero_()
        layer.requires_grad_(False)
    return layer


def pool(cfg: ModelConfig, channels: int, kernel: int, stride: int) -> nn.Module:
    if cfg.pooling == "max":
        return nn.MaxPool2d(kernel, stride)
    if cfg.pooling == "avg":
        return nn.AvgPool2d(kernel, stride)
    # LeCun's subsampling units are squashed like every other unit
    return nn.Sequential(TrainableSubsampling(channels, kernel, stride), activation(cfg.activation))


def input_pad(cfg: ModelConfig) -> dict[str, nn.Module]:
    if not cfg.input_pad:
        return {}
    pad = nn.ZeroPad2d if cfg.padding_mode == "zeros" else nn.ReplicationPad2d
    return {"pad": pad(cfg.input_pad)}
