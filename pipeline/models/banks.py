"""Classical kernel banks for a fixed first layer: engineered kernels to compare with learned ones.

Seeds 000, 001 and 003 show Gabor, Prewitt, Sobel, Gaussian and Laplacian kernels next to the
kernels a CNN learns. `bank(name, n, k)` gives n kernels of k x k for a first layer with n
output maps. The rule, so any n works:

- gabor: n orientations spread evenly, channel i at i * 180/n degrees (cosine phase,
  sigma = k/4, wavelength = k/2);
- gaussian, laplacian (of Gaussian): n scales spread evenly, sigma from 0.5 to k/4;
- prewitt, sobel: the 8 compass directions of the 3x3 kernel (0, 45, ..., 315 degrees),
  cycled: channel i gets direction i mod 8 (LeNet's 6 maps get 6 directions, AlexNet's 96
  get each direction 12 times). 3x3 kernels sit at the centre of a larger k x k.

Every kernel is scaled to unit L2 norm so that the first layer's output scale does not depend
on the bank; edge and Laplacian kernels are zero-sum, so flat regions give 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# seed 000's Prewitt_horizontal and seed 001's Sobel, the 0-degree compass kernels
_PREWITT = ((1, 1, 1), (0, 0, 0), (-1, -1, -1))
_SOBEL = ((1, 2, 1), (0, 0, 0), (-1, -2, -1))
# the outer ring of a 3x3 kernel, clockwise from the top left: one step is 45 degrees
_RING = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))


def compass(base: tuple[tuple[int, ...], ...], direction: int) -> Tensor:
    """`base` rotated clockwise by `direction` x 45 degrees (its ring shifted by that many)."""
    ring = [base[r][c] for r, c in _RING]
    kernel = torch.zeros(3, 3)
    for step, (r, c) in enumerate(_RING):
        kernel[r, c] = ring[(step - direction) % 8]
    return kernel


def _grid(k: int) -> tuple[Tensor, Tensor]:
    axis = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    return torch.meshgrid(axis, axis, indexing="ij")


def _spread(i: int, n: int, low: float, high: float) -> float:
    return low + (high - low) * i / max(n - 1, 1)


def gabor(theta: float, k: int) -> Tensor:
    y, x = _grid(k)
    sigma, wavelength = k / 4, k / 2
    along = x * math.cos(theta) + y * math.sin(theta)
    envelope = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    return envelope * torch.cos(2 * math.pi * along / wavelength)


def gaussian(sigma: float, k: int) -> Tensor:
    y, x = _grid(k)
    return torch.exp(-(x**2 + y**2) / (2 * sigma**2))


def laplacian_of_gaussian(sigma: float, k: int) -> Tensor:
    """Negative at the centre, like the 3x3 Laplacian [[0, 1, 0], [1, -4, 1], [0, 1, 0]]."""
    y, x = _grid(k)
    r2 = x**2 + y**2
    return (r2 - 2 * sigma**2) * torch.exp(-r2 / (2 * sigma**2))


def _centred(kernel: Tensor, k: int) -> Tensor:
    pad = (k - kernel.shape[-1]) // 2
    return torch.nn.functional.pad(kernel, (pad, pad, pad, pad))


def _kernel(name: str, i: int, n: int, k: int) -> Tensor:
    if name == "gabor":
        return gabor(math.pi * i / n, k)
    if name == "gaussian":
        return gaussian(_spread(i, n, 0.5, k / 4), k)
    if name == "laplacian":
        return laplacian_of_gaussian(_spread(i, n, 0.5, k / 4), k)
    base = {"prewitt": _PREWITT, "sobel": _SOBEL}[name]
    return _centred(compass(base, i % 8), k)


def bank(name: str, n: int, k: int) -> Tensor:
    """n fixed k x k kernels of the named bank (see the module docstring), unit L2 norm each."""
    kernels = torch.stack([_kernel(name, i, n, k) for i in range(n)])
    if name != "gaussian":
        kernels = kernels - kernels.mean(dim=(1, 2), keepdim=True)
    return kernels / kernels.flatten(1).norm(dim=1)[:, None, None]
