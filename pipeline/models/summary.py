"""Architecture report: per layer, output shape, parameters, connections and activation memory.

Shapes come from the output-size formula (`pipeline.models.geometry`), not from running the
network, so even AlexNet at 224x224 costs no forward pass (a layer without a rule, in a user's
own network, is measured on the meta device). Connections are counted as LeCun
et al. 1998 count them: for each output unit, the inputs it sums plus one for its
bias; convolutions count every position (C1: 28 x 28 x 6 x (25 + 1) = 122,304), shared
weights or not. Pooling units count their window (LeCun's trainable subsampling adds its
bias: 5 per unit), SPP and GAP units their bin, the RBF output its 84 inputs. Activations,
normalisation, dropout, padding and flatten count none; a layer without a rule counts as
unknown (None, printed "?"), and the total then counts the known ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import singledispatch

from torch import nn

from pipeline.models.build import Network
from pipeline.models.geometry import PADS, SHAPE_PRESERVING, Shape, output_shape
from pipeline.models.layers import (
    ConnectionTableConv2d,
    GlobalAvgPool,
    RBFOutput,
    SpatialPyramidPool,
    TrainableSubsampling,
)

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str  # the block's layers, e.g. "Conv2d+ReLU"
    output_shape: Shape  # per image
    params: int  # trainable
    frozen: int  # parameters that never train (a classical first-layer bank)
    connections: int | None  # None: no rule for one of its layers
    activation_bytes: int  # the output at float32, per image


def _windowed_inputs(module: nn.Module) -> int:
    kernel = module.kernel_size
    return kernel * kernel if isinstance(kernel, int) else math.prod(kernel)


def _bin_lengths(size: int, bins: int) -> int:
    """Total length of adaptive pooling's bins [floor(i*size/bins), ceil((i+1)*size/bins))."""
    return sum(-(-(i + 1) * size // bins) - i * size // bins for i in range(bins))


@singledispatch
def connections(module: nn.Module, shape: Shape, out: Shape) -> int | None:
    """Connections of `module` for a per-image input `shape` and output `out` (see above);
    None for a layer without a rule."""
    return None


@connections.register
def _(module: nn.Sequential, shape: Shape, out: Shape) -> int | None:
    counts = []
    for child in module:
        child_out = output_shape(child, shape)
        counts.append(connections(child, shape, child_out))
        shape = child_out
    return None if None in counts else sum(counts)


@connections.register
def _(module: nn.Conv2d, shape: Shape, out: Shape) -> int:
    per_unit = module.in_channels // module.groups * _windowed_inputs(module)
    return math.prod(out) * (per_unit + (module.bias is not None))


@connections.register
def _(module: ConnectionTableConv2d, shape: Shape, out: Shape) -> int:
    return out[1] * out[2] * module.connections_per_position


@connections.register
def _(module: TrainableSubsampling, shape: Shape, out: Shape) -> int:
    return math.prod(out) * (_windowed_inputs(module) + 1)


@connections.register(nn.MaxPool2d)
@connections.register(nn.AvgPool2d)
def _(module: nn.Module, shape: Shape, out: Shape) -> int:
    return math.prod(out) * _windowed_inputs(module)


@connections.register
def _(module: SpatialPyramidPool, shape: Shape, out: Shape) -> int:
    channels, height, width = shape
    bins = (_bin_lengths(height, n) * _bin_lengths(width, n) for n in module.levels)
    return channels * sum(bins)


@connections.register
def _(module: GlobalAvgPool, shape: Shape, out: Shape) -> int:
    return math.prod(shape)


@connections.register
def _(module: nn.Linear, shape: Shape, out: Shape) -> int:
    return module.out_features * (module.in_features + (module.bias is not None))


@connections.register
def _(module: RBFOutput, shape: Shape, out: Shape) -> int:
    return module.num_classes * module.in_features


def _none(module: nn.Module, shape: Shape, out: Shape) -> int:
    return 0


for _kind in (*SHAPE_PRESERVING, *PADS, nn.Flatten):
    connections.register(_kind, _none)


def _kind_of(block: nn.Module) -> str:
    """A sequence of layers by their kinds (Conv2d+ReLU), any other module by its class."""
    if not isinstance(block, nn.Sequential):
        return type(block).__name__
    return "+".join(_kind_of(child) for child in block)


def layer_rows(layers: Sequence[tuple[str, nn.Module]], input_shape: Shape) -> list[LayerRow]:
    """One row per named block, in forward order, for a per-image `input_shape` (C, H, W)."""
    rows, shape = [], tuple(input_shape)
    for name, block in layers:
        out = output_shape(block, shape)
        params = list(block.parameters())
        rows.append(
            LayerRow(
                name=name,
                kind=_kind_of(block),
                output_shape=out,
                params=sum(p.numel() for p in params if p.requires_grad),
                frozen=sum(p.numel() for p in params if not p.requires_grad),
                connections=connections(block, shape, out),
                activation_bytes=math.prod(out) * FLOAT32_BYTES,
            )
        )
        shape = out
    return rows


_SUMMED = ("params", "frozen", "connections", "activation_bytes")


def format_table(rows: Sequence[LayerRow]) -> str:
    """The rows as an aligned text table, with a totals line."""
    header = ("layer", "type", "output", "params", "frozen", "connections", "act. bytes")
    body = [(r.name, r.kind, _fmt(r.output_shape), *(getattr(r, f) for f in _SUMMED)) for r in rows]
    total = ("total", "", "", *(_total([getattr(r, f) for r in rows]) for f in _SUMMED))
    cells = [header, *(list(map(_cell, row)) for row in [*body, total])]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        left = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=False)]
        right = [cell.rjust(width) for cell, width in zip(row[3:], widths[3:], strict=True)]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, cells[1:-1]), rule, line(cells[-1])])


def _total(values: Sequence[int | None]) -> int | str:
    known = sum(v for v in values if v is not None)
    return known if None not in values else f"{known:,} + ?"


def _cell(value: int | str | None) -> str:
    if value is None:
        return "?"
    return f"{value:,}" if isinstance(value, int) else value


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


def describe(model: Network) -> str:
    """The summary of a built network, at the input shape it was built for."""
    side = model.min_input_size
    sizes = "this size only" if model.fixed_size else f"any size from {side}x{side}"
    title = (
        f"{model.name}: input {_fmt(model.expected_input)} ({sizes}), "
        f"{model.hparams['num_classes']} classes"
    )
    rows = layer_rows(model.layers(), model.expected_input)
    return f"{title}\n{format_table(rows)}"
