"""Augmentation of whole batches on the training device (LeCun 1998's flips and small shifts,
He et al. 2015's multi-size training).

Each function takes a float batch N x C x H x W and draws one random choice per image
(one size per batch for multi-size training), using torch's seeded generator.
"""

from __future__ import annotations

import random

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


def random_size(images: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Resize the batch to one of `sizes` (SPP's multi-size training, He et al.)."""
    size = random.choice(sizes)
    if size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def augment(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """The training batch as `cfg` augments it: flips, then shifts, then a size."""
    if cfg.flip:
        images = random_flip(images)
    images = random_shift(images, cfg.max_shift)
    return random_size(images, cfg.sizes) if cfg.sizes else images
