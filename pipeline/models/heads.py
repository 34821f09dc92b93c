"""The classifiers a backbone's feature maps can go to: fc, gap (Lin et al. 2013)
and spp (He et al. 2015).

- fc: flatten and fully connected layers (LeNet-5: F6 84, then the output; AlexNet: dropout,
  4096, dropout, 4096, output). Its first layer's width fixes the input resolution.
- gap: Network in Network. A 1x1 convolution gives one map per class and global average
  pooling turns each map into its class score: no fully connected layer, any input size.
- spp: He et al. Max pooling into a fixed pyramid of bins (`model.spp_levels`), so any input
  size gives the same number of features for the fully connected layers that follow.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pipeline.config import HEAD_NAMES, ModelConfig
from pipeline.models.geometry import Shape
from pipeline.models.layers import GlobalAvgPool, RBFOutput, SpatialPyramidPool, activation
from pipeline.registry import Registry

# LeNet-5 (C1-C5) and AlexNet (conv1-conv5) both number their first fully connected layer 6
FIRST_FC = 6


BuildHead = Callable[[ModelConfig, Shape, int, str], nn.Sequential]


@dataclass(frozen=True)
class HeadEntry:
    # (resolved config, backbone output shape, class count, fc layer name template) -> blocks
    build: BuildHead
    # True: needs the training resolution, and the backbone's tail (see backbones.py)
    fixed_size: bool


HEADS: Registry[HeadEntry] = Registry("head", HEAD_NAMES)


def register_head(name: str, fixed_size: bool) -> Callable[[BuildHead], BuildHead]:
    """Decorator: the builder of head `name` (`model.head=name`)."""

    def decorate(build: BuildHead) -> BuildHead:
        HEADS.add(name, HeadEntry(build, fixed_size))
        return build

    return decorate


def classifier(
    cfg: ModelConfig, in_features: int, num_classes: int, fc_name: str
) -> dict[str, nn.Module]:
    """Hidden fully connected layers (dropout first, when set), then the output layer."""
    blocks: dict[str, nn.Module] = {}
    for index, width in enumerate(cfg.hidden, start=FIRST_FC):
        dropout = [nn.Dropout(cfg.dropout)] if cfg.dropout else []
        linear = nn.Linear(in_features, width)
        act = activation(cfg.activation)
        blocks[fc_name.format(index)] = nn.Sequential(*dropout, linear, act)
        in_features = width
    output = RBFOutput if cfg.output == "rbf" else nn.Linear
    blocks["output"] = output(in_features, num_classes)
    return blocks


@register_head("fc", fixed_size=True)
def fc_head(cfg: ModelConfig, features: Shape, num_classes: int, fc_name: str) -> nn.Sequential:
    flat = math.prod(features)
    return nn.Sequential(
        OrderedDict({"flatten": nn.Flatten()} | classifier(cfg, flat, num_classes, fc_name))
    )


@register_head("gap", fixed_size=False)
def gap_head(cfg: ModelConfig, features: Shape, num_classes: int, fc_name: str) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict({"classes": nn.Conv2d(features[0], num_classes, 1), "gap": GlobalAvgPool()})
    )


@register_head("spp", fixed_size=False)
def spp_head(cfg: ModelConfig, features: Shape, num_classes: int, fc_name: str) -> nn.Sequential:
    spp = SpatialPyramidPool(cfg.spp_levels)
    pooled = features[0] * spp.bins
    return nn.Sequential(OrderedDict({"spp": spp} | classifier(cfg, pooled, num_classes, fc_name)))
