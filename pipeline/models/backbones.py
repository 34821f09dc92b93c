"""The feature extractors: LeNet-5 in its three forms (the lecture notes' two Keras versions,
LeCun et al. 1998) and AlexNet (Krizhevsky et al. 2012).

A builder returns an nn.Sequential of named blocks in forward order (pad, C1, S2, ... or
conv1, norm1, pool1, ...), so the summary prints one row per layer under the paper's name.

The tail: each backbone's last block exists only to reach the fixed size of its fully
connected layers: LeNet's C5 (a 5x5 window on S4's 5x5 maps, "a full connection", LeCun et al. 1998)
and AlexNet's pool5 (13x13 -> the 6x6 fc6 expects). Only the fc head gets it. SPP takes the
place of the last pooling layer (He et al. 2015) and GAP's class maps the place of C5 (NIN;
Lin et al. 2013), so those heads read the larger maps before the tail.

Smallest input side the GAP and SPP heads accept (`Network.min_input_size`, pinned by the
tests): 12 for the LeNet-5s built for 28x28 (lenet5 and lenet5_classic with their 2 px pad,
lenet5_keras), 16 for lenet5 built for 32x32 (no pad), 7 for alexnet with the cifar stem
and 31 with the imagenet stem.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from pipeline.config import BACKBONE_NAMES, ModelConfig, require
from pipeline.models.banks import bank
from pipeline.models.geometry import Shape
from pipeline.models.layers import ConnectionTableConv2d, TrainableSubsampling, activation
from pipeline.registry import Registry

# LeCun et al. 1998, Table I, as the paper prints it: row i is S2 map i, column j is C3 map j,
# X means map i feeds map j. Maps 0-5 see 3 contiguous S2 maps, 6-11 four contiguous, 12-14
# four non-contiguous, 15 all six: 60 connections.
LECUN_C3_TABLE = (
    "X   XXX  XXXX XX",
    "XX   XXX  XXXX X",
    "XXX   XXX  X XXX",
    " XXX  XXXX  X XX",
    "  XXX  XXXX XX X",
    "   XXX  XXXX XXX",
)


def c3_connections() -> list[list[bool]]:
    return [[mark == "X" for mark in row] for row in LECUN_C3_TABLE]


BuildBackbone = Callable[[ModelConfig, int, bool], nn.Sequential]


@dataclass(frozen=True)
class BackboneEntry:
    # (resolved config, input channels, with the tail?) -> named blocks
    build: BuildBackbone
    # the values of the config keys left null, for this config and input shape (C, H, W)
    defaults: Callable[[ModelConfig, Shape], dict[str, Any]]
    # how the fc/spp heads name the fully connected layers, numbered from 6: "F{}" -> F6
    fc_name: str


BACKBONES: Registry[BackboneEntry] = Registry("backbone", BACKBONE_NAMES)


def register_backbone(
    name: str, defaults: Callable[[ModelConfig, Shape], dict[str, Any]], fc_name: str
) -> Callable[[BuildBackbone], BuildBackbone]:
    """Decorator: the builder of backbone `name` (`model.backbone=name`)."""

    def decorate(build: BuildBackbone) -> BuildBackbone:
        BACKBONES.add(name, BackboneEntry(build, defaults, fc_name))
        return build

    return decorate


def _conv(
    cfg: ModelConfig,
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding, groups=groups, padding_mode=cfg.padding_mode)


def _first_conv(
    cfg: ModelConfig, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0
) -> nn.Conv2d:
    """The first layer: learned, or a frozen classical bank (weights fixed, bias 0, no grads).

    With several input channels each kernel is applied to the channel mean."""
    conv = _conv(cfg, cin, cout, k, stride, padding)
    if cfg.first_layer != "learned":
        with torch.no_grad():
            conv.weight.copy_(bank(cfg.first_layer, cout, k)[:, None] / cin)
            conv.bias.zero_()
        conv.requires_grad_(False)
    return conv


def _pool(cfg: ModelConfig, channels: int, kernel: int, stride: int) -> nn.Module:
    if cfg.pooling == "max":
        return nn.MaxPool2d(kernel, stride)
    if cfg.pooling == "avg":
        return nn.AvgPool2d(kernel, stride)
    # LeCun's subsampling units are squashed like every other unit
    return nn.Sequential(TrainableSubsampling(channels, kernel, stride), activation(cfg.activation))


def _input_pad(cfg: ModelConfig) -> dict[str, nn.Module]:
    if not cfg.input_pad:
        return {}
    pad = nn.ZeroPad2d if cfg.padding_mode == "zeros" else nn.ReplicationPad2d
    return {"pad": pad(cfg.input_pad)}


@dataclass(frozen=True)
class LeNetForm:
    """What tells the three LeNet-5s apart, besides their default options."""

    # 0: valid on the 32x32 field (lenet5, LeCun 1998); 2: Keras 'same' on 28x28 (lenet5_keras)
    c1_padding: int
    # C3 wired by LECUN_C3_TABLE (LeCun et al. 1998) rather than to all six S2 maps
    c3_table: bool
    # 5: C5 sees all of S4 (a full connection at 32x32); 1: the Keras variant's 1x1 C5
    c5_kernel: int


def lenet(form: LeNetForm, cfg: ModelConfig, in_channels: int, tail: bool) -> nn.Sequential:
    require(cfg.stem is None, "model.stem", cfg.stem, "null (only alexnet has stems)")
    require(cfg.width is None, "model.width", cfg.width, "null (only alexnet has a width)")
    act = partial(activation, cfg.activation)
    c3 = ConnectionTableConv2d(c3_connections(), 5) if form.c3_table else _conv(cfg, 6, 16, 5)
    blocks = _input_pad(cfg) | {
        "C1": nn.Sequential(_first_conv(cfg, in_channels, 6, 5, padding=form.c1_padding), act()),
        "S2": _pool(cfg, 6, 2, 2),
        "C3": nn.Sequential(c3, act()),
        "S4": _pool(cfg, 16, 2, 2),
    }
    if tail:
        blocks["C5"] = nn.Sequential(_conv(cfg, 16, 120, form.c5_kernel), act())
    return nn.Sequential(OrderedDict(blocks))


def lenet_defaults(
    activation: str, pooling: str, field: int, cfg: ModelConfig, shape: Shape
) -> dict[str, Any]:
    """`field`: the input side the network was drawn for; the pad brings the dataset to it."""
    return {
        "activation": activation,
        "pooling": pooling,
        "input_pad": max(0, (field - min(shape[1:])) // 2),
        "hidden": [84],
        "spp_levels": [4, 2, 1],
        "dropout": 0.0,
    }


@register_backbone("lenet5", partial(lenet_defaults, "relu", "max", 32), "F{}")
def lenet5(cfg: ModelConfig, in_channels: int, tail: bool) -> nn.Sequential:
    """Seed 000: Keras, 32x32 field (MNIST padded by 2), relu, max pooling, 5x5 C5."""
    return lenet(LeNetForm(c1_padding=0, c3_table=False, c5_kernel=5), cfg, in_channels, tail)


@register_backbone("lenet5_keras", partial(lenet_defaults, "relu", "avg", 0), "F{}")
def lenet5_keras(cfg: ModelConfig, in_channels: int, tail: bool) -> nn.Sequential:
    """Seed 001: Keras, 28x28 'same' C1, average pooling, 1x1 C5 (257,546 parameters)."""
    return lenet(LeNetForm(c1_padding=2, c3_table=False, c5_kernel=1), cfg, in_channels, tail)


@register_backbone("lenet5_classic", partial(lenet_defaults, "scaled_tanh", "trainable", 32), "F{}")
def lenet5_classic(cfg: ModelConfig, in_channels: int, tail: bool) -> nn.Sequential:
    """LeCun et al. 1998: scaled tanh, trainable subsampling, C3 wired by its table."""
    return lenet(LeNetForm(c1_padding=0, c3_table=True, c5_kernel=5), cfg, in_channels, tail)


def alexnet_defaults(cfg: ModelConfig, shape: Shape) -> dict[str, Any]:
    width = cfg.width or 1.0
    return {
        "activation": "relu",
        "pooling": "max",
        "input_pad": 0,
        "hidden": [round(4096 * width)] * 2,
        "spp_levels": [6, 3, 2, 1],
        "dropout": 0.5,
        # the imagenet stem's 11x11 stride 4 leaves too little of a small image
        "stem": "imagenet" if min(shape[1:]) >= 64 else "cifar",
        "width": 1.0,
    }


@register_backbone("alexnet", alexnet_defaults, "fc{}")
def alexnet(cfg: ModelConfig, in_channels: int, tail: bool) -> nn.Sequential:
    """Krizhevsky et al. 2012: 96-256-384-384-256 kernels, LRN after conv1 and conv2,
    overlapping 3x3 stride-2 max pooling, groups=2 where the model was split over two GPUs
    (conv2, conv4, conv5: each kernel sees the maps on its own GPU). At 3x224x224 the imagenet
    stem (11x11 stride 4, pad 2) gives 55x55 after conv1 and 256x6x6 after pool5. The cifar
    stem (5x5 stride 1, pad 2) keeps 32x32 inputs large enough for the same five layers.
    """
    width = cfg.width

    def scaled(channels: int) -> int:
        return max(2, 2 * round(channels * width / 2))  # even, so groups=2 still splits

    def lrn() -> nn.Module:
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2)

    act = partial(activation, cfg.activation)
    c1, c2, c3, c4, c5 = (scaled(c) for c in (96, 256, 384, 384, 256))
    k1, s1 = (11, 4) if cfg.stem == "imagenet" else (5, 1)
    blocks = _input_pad(cfg) | {
        "conv1": nn.Sequential(_first_conv(cfg, in_channels, c1, k1, s1, padding=2), act()),
        "norm1": lrn(),
        "pool1": _pool(cfg, c1, 3, 2),
        "conv2": nn.Sequential(_conv(cfg, c1, c2, 5, padding=2, groups=2), act()),
        "norm2": lrn(),
        "pool2": _pool(cfg, c2, 3, 2),
        "conv3": nn.Sequential(_conv(cfg, c2, c3, 3, padding=1), act()),
        "conv4": nn.Sequential(_conv(cfg, c3, c4, 3, padding=1, groups=2), act()),
        "conv5": nn.Sequential(_conv(cfg, c4, c5, 3, padding=1, groups=2), act()),
    }
    if tail:
        blocks["pool5"] = _pool(cfg, c5, 3, 2)
    return nn.Sequential(OrderedDict(blocks))
