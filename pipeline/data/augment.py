"""Augmentation of whole batches on the training device (LeCun 1998's flips and small shifts,
He et al. 2015's multi-size training).

Each function takes a float batch N x C x H x W and draws one random choice per image
(one size per batch for multi-size training), using torch's seeded generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.config import AugmentConfig


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the images left-right."""
    flip = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels each way, filling with zeros."""
    if max_shift == 0:
        return images
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), device=device)
    rows = (torch.arange(h, device=device) + dy)[:, None, :, None]
    cols = (torch.arange(w, device=device) + dx)[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channels = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The batch as float images of `height` x `width` (bilinear, antialiased when shrinking):
    the one resize of training and evaluation alike."""
    if images.shape[-2:] == (height, width):
        return images.float()
    return F.interpolate(images.float(), size=(height, width), mode="bilinear", antialias=True)


def training_heights(height: int, scale_range: list[float]) -> tuple[int, int]:
    """The smallest and largest image height multi-size training draws, for images `height`
    px high (rounded as the evaluation rounds its test sizes)."""
    return round(height * scale_range[0]), round(height * scale_range[1])


def draw_height(heights: tuple[int, int]) -> int:
    """One height from `heights` (inclusive), drawn on the host. Log-uniform: each factor of
    size as often (21 to 28 px as often as 42 to 56), since a convolution sees scale as a
    ratio; the ends are drawn as often as their neighbours."""
    low, high = heights
    if low == high:
        return low
    log_size = torch.empty(()).uniform_(math.log(low - 0.5), math.log(high + 0.5))
    return min(max(round(math.exp(log_size.item())), low), high)


def resize_to_height(images: torch.Tensor, height: int) -> torch.Tensor:
    """The batch resized to `height`, keeping its aspect ratio."""
    return resize(images, height, round(images.shape[-1] * height / images.shape[-2]))


def augment(images: torch.Tensor, cfg: AugmentConfig, height: int) -> torch.Tensor:
    """The training batch as `cfg` augments it: flips, then shifts, then resized to `height`
    (from `draw_height`, drawn on the host first, so that all this runs on the device: a CUDA
    graph's part)."""
    if cfg.flip:
        images = random_flip(images)
    return resize_to_height(random_shift(images, cfg.max_shift), height)
