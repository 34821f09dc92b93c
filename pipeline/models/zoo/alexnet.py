"""AlexNet (Krizhevsky et al. 2012), with a stem for small images.

Smallest input side the GAP and SPP heads accept (pinned by the tests): 7 with the cifar stem,
31 with the imagenet stem.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

from torch import nn

from pipeline.config import ModelConfig
from pipeline.models.backbones import conv, first_conv, input_pad, pool, register_backbone
from pipeline.models.geometry import Shape
from pipeline.models.layers import activation


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
    blocks = input_pad(cfg) | {
        "conv1": nn.Sequential(first_conv(cfg, in_channels, c1, k1, s1, padding=2), act()),
        "norm1": lrn(),
        "pool1": pool(cfg, c1, 3, 2),
        "conv2": nn.Sequential(conv(cfg, c1, c2, 5, padding=2, groups=2), act()),
        "norm2": lrn(),
        "pool2": pool(cfg, c2, 3, 2),
        "conv3": nn.Sequential(conv(cfg, c2, c3, 3, padding=1), act()),
        "conv4": nn.Sequential(conv(cfg, c3, c4, 3, padding=1, groups=2), act()),
        "conv5": nn.Sequential(conv(cfg, c4, c5, 3, padding=1, groups=2), act()),
    }
    if tail:
        blocks["pool5"] = pool(cfg, c5, 3, 2)
    return nn.Sequential(OrderedDict(blocks))
