"""The building blocks the seeds describe that torch does not ship as layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScaledTanh(nn.Module):
    """LeCun et al. 1998's squashing function f(a) = 1.7159 tanh(2a/3).

    The constants make f(1) = 1 and f(-1) = -1, where the second derivative is largest, so
    targets of +-1 sit in the sigmoid's non-saturated range.
    """

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "scaled_tanh": ScaledTanh,
    "sigmoid": nn.Sigmoid,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module for `model.activation`."""
    return ACTIVATIONS[name]()


class TrainableSubsampling(nn.Module):
    """LeNet-5's S2/S4: the sum of each kernel x kernel window, times a per-map coefficient,
    plus a per-map bias (LeCun et al. 1998: 2 parameters per map, 5 connections per unit for 2x2).

    Initialised to the window average (coefficient 1/kernel^2, bias 0).
    """

    def __init__(self, channels: int, kernel_size: int = 2, stride: int | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride or kernel_size
        self.weight = nn.Parameter(torch.full((channels,), 1.0 / kernel_size**2))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        window_sum = F.avg_pool2d(x, self.kernel_size, self.stride) * self.kernel_size**2
        return window_sum * self.weight[:, None, None] + self.bias[:, None, None]


class ConnectionTableConv2d(nn.Module):
    """A valid convolution where output map j sees only the input maps its table column marks.

    LeCun et al. 1998 wire C3 this way (Table I) "to keep the number of connections within
    reasonable bounds" and to break symmetry. Only the marked (input, output) kernels are
    parameters, so C3 has 60 x 25 + 16 = 1,516 of them rather than a full layer's 2,416.

    `table[i][j]` is True when input map i feeds output map j (rows as the paper prints them).
    """

    def __init__(self, table: Sequence[Sequence[bool]], kernel_size: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = len(table), len(table[0])
        self.kernel_size = kernel_size
        pairs = [(j, i) for i, row in enumerate(table) for j, linked in enumerate(row) if linked]
        self.register_buffer("out_index", torch.tensor([j for j, _ in pairs]), persistent=False)
        self.register_buffer("in_index", torch.tensor([i for _, i in pairs]), persistent=False)
        # torch's conv default: uniform in +-1/sqrt(fan-in), with each output map's own fan-in
        fan_in = [sum(row[j] for row in table) * kernel_size**2 for j in range(self.out_channels)]
        weight_bound = torch.tensor([fan_in[j] ** -0.5 for j, _ in pairs])[:, None, None]
        bias_bound = torch.tensor([n**-0.5 for n in fan_in])
        shape = (len(pairs), kernel_size, kernel_size)
        self.weight = nn.Parameter((torch.rand(shape) * 2 - 1) * weight_bound)
        self.bias = nn.Parameter((torch.rand(self.out_channels) * 2 - 1) * bias_bound)

    @property
    def connections_per_position(self) -> int:
        """Inputs summed at one position of all output maps, biases included."""
        return self.weight.numel() + self.out_channels

    def dense_weight(self) -> Tensor:
        """The full out x in x k x k kernel, zero where the table has no connection."""
        k = self.kernel_size
        dense = self.weight.new_zeros(self.out_channels, self.in_channels, k, k)
        return dense.index_put((self.out_index, self.in_index), self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias)


class SpatialPyramidPool(nn.Module):
    """He et al. 2015: max-pool each map into n x n bins for every pyramid level and
    concatenate, so any input size gives C * sum(n^2) features (4,2,1: 21 bins per map).

    Adaptive pooling sizes the bins from the input, as the paper's ceil/floor windows do.
    """

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        self.levels = tuple(levels)

    @property
    def bins(self) -> int:
        return sum(n * n for n in self.levels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in self.levels], dim=1)


class GlobalAvgPool(nn.Module):
    """Network in Network (Lin et al. 2013): the mean of each map, so a class map gives a score."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def hadamard_codes(num_classes: int, dim: int) -> Tensor:
    """`num_classes` distinct +-1 codes of length `dim`: rows 1.. of a Sylvester-Hadamard matrix
    (entry (r, c) = (-1)^popcount(r & c)), mutually orthogonal when `dim` is a power of two."""
    bits = max(num_classes, dim).bit_length()
    rows = torch.arange(1, num_classes + 1)[:, None]
    cols = torch.arange(dim)[None, :]
    parity = torch.zeros(num_classes, dim, dtype=torch.long)
    for bit in range(bits):
        parity ^= ((rows >> bit) & 1) & ((cols >> bit) & 1)
    return 1.0 - 2.0 * parity.float()


class RBFOutput(nn.Module):
    """LeNet-5's output layer: each class unit computes the Euclidean distance between its input
    (F6) and a fixed +-1 code (LeCun et al. 1998: "Gaussian connections"). It returns minus the
    squared distance, so the nearest code has the largest score and argmax / cross-entropy work
    as for a linear layer. The codes are a buffer: fixed, not trained, saved with the model.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.register_buffer("codes", hadamard_codes(num_classes, in_features))

    def forward(self, x: Tensor) -> Tensor:
        return -(x[:, None, :] - self.codes).pow(2).sum(dim=-1)
