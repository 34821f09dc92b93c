"""LeNet-5 in its three forms: the lecture notes' two Keras versions and LeCun et al. 1998.

Smallest input side the GAP and SPP heads accept (`Network.min_input_size`, pinned by the
tests): 12 for the LeNet-5s built for 28x28 (lenet5 and lenet5_classic with their 2 px pad,
lenet5_keras), 16 for lenet5 built for 32x32 (no pad).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from pipeline.config import ModelConfig, require
from pipeline.models.backbones import conv, first_conv, input_pad, pool, register_backbone
from pipeline.models.geometry import Shape
from pipeline.models.layers import ConnectionTableConv2d, activation

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
    require(cfg.stem is None, "model.stem", cfg.stem, "null (LeNet-5 has one stem)")
    require(cfg.width is None, "model.width", cfg.width, "null (LeNet-5 has one width)")
    act = partial(activation, cfg.activation)
    c3 = ConnectionTableConv2d(c3_connections(), 5) if form.c3_table else conv(cfg, 6, 16, 5)
    blocks = input_pad(cfg) | {
        "C1": nn.Sequential(first_conv(cfg, in_channels, 6, 5, padding=form.c1_padding), act()),
        "S2": pool(cfg, 6, 2, 2),
        "C3": nn.Sequential(c3, act()),
        "S4": pool(cfg, 16, 2, 2),
    }
    if tail:
        blocks["C5"] = nn.Sequential(conv(cfg, 16, 120, form.c5_kernel), act())
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
