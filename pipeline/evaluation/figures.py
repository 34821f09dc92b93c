"""Figures people would rather look at than read: built on `matplotlib.figure.Figure`
directly (no pyplot global state, no display needed). Torch is only a type here, so that
`pipeline.report`, which draws from CSV files, starts without importing it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    import torch


def confusion_figure(confusion: torch.Tensor, classes: list[str]) -> Figure:
    size = max(4.0, 0.45 * len(classes) + 2)
    figure = Figure(figsize=(size, size))
    axes = figure.add_subplot()
    axes.imshow(confusion.numpy(), cmap="Blues")
    ticks = range(len(classes))
    axes.set_xticks(ticks, classes, rotation=90)
    axes.set_yticks(ticks, classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    counts = confusion.tolist()
    peak = max(map(max, counts))
    for row, line in enumerate(counts):
        for col, count in enumerate(line):
            if count:
                colour = "white" if count > peak / 2 else "black"
                axes.text(col, row, int(count), ha="center", va="center", fontsize=7, color=colour)
    axes.set_title("test confusion matrix")
    return figure


def _image_grid(images: torch.Tensor, titles: list[str], columns: int, title: str) -> Figure:
    rows = max(1, math.ceil(len(images) / columns))
    figure = Figure(figsize=(columns * 1.3, rows * 1.5 + 0.4))
    figure.suptitle(title)
    for i, (image, text) in enumerate(zip(images, titles, strict=True)):
        axes = figure.add_subplot(rows, columns, i + 1)
        pixels = image.permute(1, 2, 0).squeeze(-1).float()
        span = (pixels.max() - pixels.min()).clamp_min(1e-8)
        axes.imshow(((pixels - pixels.min()) / span).numpy(), cmap="gray")
        axes.set_title(text, fontsize=7)
        axes.axis("off")
    return figure


def misclassified_figure(
    images: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    classes: list[str],
    limit: int = 32,
) -> Figure:
    """A grid of wrongly classified test images, titled 'true -> predicted' (seed 001)."""
    wrong = (predictions != labels).nonzero().flatten()[:limit]
    titles = [f"{classes[labels[i]]} -> {classes[predictions[i]]}" for i in wrong]
    title = f"misclassified test images ({int((predictions != labels).sum())} in all)"
    return _image_grid(images[wrong], titles, columns=8, title=title)


def kernels_figure(weight: torch.Tensor, limit: int = 96) -> Figure:
    """The first layer's kernels (its out x in x k x k weight): learned from data, or a fixed
    classical bank."""
    kernels = weight.detach().cpu()[:limit]
    if kernels.shape[1] not in (1, 3):
        kernels = kernels.mean(dim=1, keepdim=True)
    titles = [str(i) for i in range(len(kernels))]
    return _image_grid(kernels, titles, columns=min(12, len(kernels)), title="first-layer kernels")


@dataclass
class Curve:
    """One network's test accuracy by input size, a line of `resolution_figure`."""

    label: str
    rows: list[dict[str, float]]  # size, accuracy
    min_input_size: int
    fixed_size: bool  # fc heads: each test size is resized back to their one size


def resolution_figure(curves: list[Curve], title: str = "accuracy versus input size") -> Figure:
    """Test accuracy against input size, one line per network (fc resized, GAP, SPP), each
    GAP or SPP network's smallest accepted input marked by a dotted line of its colour."""
    figure = Figure(figsize=(6.5, 4.2))
    axes = figure.add_subplot()
    for curve in curves:
        kind = f"resized to {curve.min_input_size} px" if curve.fixed_size else "native"
        sizes, accuracies = [r["size"] for r in curve.rows], [r["accuracy"] for r in curve.rows]
        (line,) = axes.plot(sizes, accuracies, marker="o", label=f"{curve.label} ({kind})")
        if not curve.fixed_size:
            axes.axvline(curve.min_input_size, color=line.get_color(), linestyle=":", alpha=0.7)
    axes.set_xlabel("test input size (px); dotted: smallest input a GAP/SPP network takes")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower center")
    axes.set_title(title)
    return figure
