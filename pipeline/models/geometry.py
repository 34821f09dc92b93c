"""Shape arithmetic: the output-size formula and the shapes it gives layer by layer.

Seed 001: a layer with a W-pixel window, padding P and stride S maps I pixels to
floor((I - W + 2P) / S) + 1. `output_shape` applies it (and the shape rules of the other
layers) without running the network, so a model knows, before it sees data, how many
features its fc head gets at the training size and the smallest input its GAP or SPP head
accepts; the summary report prints the same shapes. A layer without a rule (a user's own
network) is measured instead: run on the meta device, which computes shapes only.
"""

from __future__ import annotations

import math
from functools import singledispatch
from itertools import chain

import torch
from torch import nn
from torch.func import functional_call

from pipeline.models.layers import (
    ACTIVATIONS,
    ConnectionTableConv2d,
    GlobalAvgPool,
    RBFOutput,
    SpatialPyramidPool,
    TrainableSubsampling,
)

Shape = tuple[int, ...]

# layers that keep their input's shape (no connections to count either)
SHAPE_PRESERVING: tuple[type[nn.Module], ...] = (
    *ACTIVATIONS.values(),
    nn.Dropout,
    nn.LocalResponseNorm,
    nn.BatchNorm2d,
    nn.Identity,
)
PADS = (nn.ZeroPad2d, nn.ReplicationPad2d)


class InputTooSmallError(ValueError):
    """A layer's window does not fit in the feature map it gets."""


def conv_output_size(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    """floor((I - W + 2P) / S) + 1: the output length of a convolution or pooling window."""
    return (size - kernel + 2 * padding) // stride + 1


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _windowed(module: nn.Module, shape: Shape, channels: int) -> Shape:
    kernel = _pair(module.kernel_size)
    stride = _pair(getattr(module, "stride", 1))
    padding = _pair(getattr(module, "padding", 0))
    dilation = _pair(getattr(module, "dilation", 1))
    out = tuple(
        conv_output_size(size, d * (k - 1) + 1, p, s)
        for size, k, p, s, d in zip(shape[1:], kernel, padding, stride, dilation, strict=True)
    )
    if min(out) < 1:
        raise InputTooSmallError(
            f"{type(module).__name__} with a {kernel[0]}x{kernel[1]} window gets "
            f"{shape[1]}x{shape[2]} maps and would output {out[0]}x{out[1]}"
        )
    return (channels, *out)


@singledispatch
def output_shape(module: nn.Module, shape: Shape) -> Shape:
    """The per-image output shape of `module` for a per-image input `shape` (C, H, W)."""
    return measured_output_shape(module, shape)


def measured_output_shape(module: nn.Module, shape: Shape) -> Shape:
    """The output shape of a forward pass on the meta device: shapes without memory or
    arithmetic, on meta copies of the weights (the module itself is left as it is). An input
    the module cannot take (a window larger than its map...) raises InputTooSmallError."""
    tensors = chain(module.named_parameters(), module.named_buffers())
    on_meta = {name: tensor.to("meta") for name, tensor in tensors}
    # two images: batch norm in training mode refuses a single value per channel
    images = torch.empty(2, *shape, device="meta")
    try:
        with torch.no_grad():
            out = functional_call(module, on_meta, (images,))
    except (RuntimeError, ValueError) as err:
        said = str(err).strip().splitlines()[0]
        raise InputTooSmallError(f"{type(module).__name__} cannot take {shape}: {said}") from err
    return tuple(out.shape[1:])


@output_shape.register
def _(module: nn.Sequential, shape: Shape) -> Shape:
    for child in module:
        shape = output_shape(child, shape)
    return shape


@output_shape.register(nn.Conv2d)
@output_shape.register(ConnectionTableConv2d)
def _(module: nn.Module, shape: Shape) -> Shape:
    return _windowed(module, shape, module.out_channels)


@output_shape.register(nn.MaxPool2d)
@output_shape.register(nn.AvgPool2d)
@output_shape.register(TrainableSubsampling)
def _(module: nn.Module, shape: Shape) -> Shape:
    return _windowed(module, shape, shape[0])


@output_shape.register(nn.ZeroPad2d)
@output_shape.register(nn.ReplicationPad2d)
def _(module: nn.Module, shape: Shape) -> Shape:
    left, right, top, bottom = module.padding
    return (shape[0], shape[1] + top + bottom, shape[2] + left + right)


@output_shape.register
def _(module: nn.Flatten, shape: Shape) -> Shape:
    return (math.prod(shape),)


@output_shape.register
def _(module: nn.Linear, shape: Shape) -> Shape:
    return (module.out_features,)


@output_shape.register
def _(module: SpatialPyramidPool, shape: Shape) -> Shape:
    return (shape[0] * module.bins,)


@output_shape.register
def _(module: GlobalAvgPool, shape: Shape) -> Shape:
    return (shape[0],)


@output_shape.register
def _(module: RBFOutput, shape: Shape) -> Shape:
    return (module.num_classes,)


def _unchanged(module: nn.Module, shape: Shape) -> Shape:
    return shape


for _kind in SHAPE_PRESERVING:
    output_shape.register(_kind, _unchanged)


def min_input_size(module: nn.Module, channels: int, limit: int = 4096) -> int:
    """The smallest square input side every window of `module` fits in."""
    for size in range(1, limit + 1):
        try:
            output_shape(module, (channels, size, size))
        except InputTooSmallError as err:
            refused = err
            continue
        return size
    raise InputTooSmallError(f"no input up to {limit}x{limit} fits: {refused}")
