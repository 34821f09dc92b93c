"""Network in Network (Lin et al. 2013), the network global average pooling comes from.

Each mlpconv layer is a small multilayer perceptron slid over the image: a k x k convolution
then two 1x1 convolutions, each followed by ReLU. The CIFAR-10 network stacks three, with 3x3
stride-2 pooling (max, then average) and dropout 0.5 between them; its last 1x1 layer gives
one map per class, which global average pooling turns into class scores. Here that last layer
is the gap head's (`model.head=gap`, conf/model/nin.yaml), so the backbone ends at the third
mlpconv's 192 maps and the fc and spp heads fit it too.

Smallest input side (pinned by the tests): 7. On CIFAR's 32x32 the maps are 15x15 after pool1
and 7x7 after pool2 (PyTorch's floor rounding; the paper's Caffe model rounds up: 16, 8).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import nn

from pipeline.config import ModelConfig, require
from pipeline.models.backbones import (
    conv,
    first_conv,
    input_pad,
    plain_defaults,
    pool,
    register_backbone,
)
from pipeline.models.geometry import Shape
from pipeline.models.layers import activation


def mlpconv(cfg: ModelConfig, first: nn.Conv2d, widths: Sequence[int]) -> nn.Sequential:
    """`first` (the k x k convolution), then a 1x1 convolution per width; each activated."""
    act = partial(activation, cfg.activation)
    layers, channels = [first, act()], first.out_channels
    for width in widths:
        layers += [conv(cfg, channels, width, 1), act()]
        channels = width
    return nn.Sequential(*layers)


def nin_defaults(cfg: ModelConfig, shape: Shape) -> dict[str, Any]:
    return plain_defaults(cfg, shape) | {"dropout": 0.5, "width": 1.0}


@register_backbone("nin", nin_defaults, "fc{}")
def nin(cfg: ModelConfig, in_channels: int, tail: bool) -> nn.Sequential:
    """Lin et al. 2013's CIFAR-10 network: mlpconv 192-160-96 (5x5), max pool, dropout,
    mlpconv 192-192-192 (5x5), average pool, dropout, mlpconv 192-192 (3x3). `model.width`
    multiplies every layer's width."""
    require(cfg.stem is None, "model.stem", cfg.stem, "null (NiN has one stem)")

    def scaled(*widths: int) -> list[int]:
        return [max(1, round(w * cfg.width)) for w in widths]

    w1, w2, w3 = scaled(192, 160, 96), scaled(192, 192, 192), scaled(192, 192)
    blocks = input_pad(cfg) | {
        "mlpconv1": mlpconv(cfg, first_conv(cfg, in_channels, w1[0], 5, padding=2), w1[1:]),
        "pool1": pool(cfg, w1[-1], 3, 2),
        "drop1": nn.Dropout(cfg.dropout),
        "mlpconv2": mlpconv(cfg, conv(cfg, w1[-1], w2[0], 5, padding=2), w2[1:]),
        "pool2": nn.AvgPool2d(3, 2),
        "drop2": nn.Dropout(cfg.dropout),
        "mlpconv3": mlpconv(cfg, conv(cfg, w2[-1], w3[0], 3, padding=1), w3[1:]),
    }
    return nn.Sequential(OrderedDict(blocks))
