"""Optimizers and learning-rate schedules from the `optimizer` and `scheduler` config groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from pipeline.config import OptimizerConfig, SchedulerConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """`cfg`'s optimizer; `fused`: its step as one kernel (parameters on a GPU)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    return optimizer(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, total_steps: int
) -> dict[str, Any] | None:
    """A Lightning `lr_scheduler` dict: one-cycle steps per batch, the others per epoch."""
    if cfg.name == "none":
        return None
    if cfg.name == "onecycle":
        lr = max(group["lr"] for group in optimizer.param_groups)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=cfg.warmup_fraction
        )
        return {"scheduler": schedule, "interval": "step"}
    if cfg.name == "step":
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, gamma=cfg.gamma)
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return {"scheduler": schedule, "interval": "epoch"}
