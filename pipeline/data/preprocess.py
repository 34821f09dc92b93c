"""DVC stage `preprocess`: raw files -> uint8 `N x C x H x W` arrays in fixed splits.

    python -m pipeline.data.preprocess dataset=mnist

Train and val are a seed-determined partition of the source's training pool; test is the
official test split (or, for sources without one, a third seed-determined part). Outputs go to
`data/processed/NAME/{train,val,test}.npz` and `meta.json` (shapes, counts per split and per
class, content checksums, the train split's per-channel mean and std), written into a staging
directory that replaces the old output only when complete. The raw files are checked against
the config's md5s first, as the fetch stage checked them: one damaged since is named, rather
than failing deep inside a decoder. All of it is numpy (and the standard library's readers of
the upstream formats): no torch.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline.cli import hydra_entry
from pipeline.config import DatasetConfig, PrepareJob, require, validate
from pipeline.data.sources import (
    SOURCES,
    RawData,
    RawFiles,
    checksum_mismatches,
    describe_mismatch,
    files_by_name,
)
from pipeline.data.store import Split, atomic_directory, data_command, save_split, write_meta
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def make_splits(raw: RawData, cfg: DatasetConfig) -> dict[str, Split]:
    """Partition the training pool into train/val (and test, when the source has none)."""
    pool = len(raw.train_labels)
    held_out = cfg.val_size + (cfg.test_size or 0)
    require(
        held_out < pool,
        "dataset.val_size",
        cfg.val_size,
        f"val_size + test_size < {pool}, the size of {cfg.name}'s training pool",
    )
    order = np.random.default_rng(cfg.split_seed).permutation(pool)

    def take(rows: np.ndarray) -> Split:
        rows = np.sort(rows)
        return Split(raw.train_images[rows], raw.train_labels[rows], rows)

    splits = {"val": take(order[: cfg.val_size])}
    if cfg.test_size is None:
        if raw.test_images is None or raw.test_labels is None:
            raise PipelineError(
                f"dataset '{cfg.name}' has no official test split: set dataset.test_size"
            )
        rows = np.arange(len(raw.test_labels))
        splits["test"] = Split(raw.test_images, raw.test_labels, rows)
    else:
        splits["test"] = take(order[cfg.val_size : held_out])
    splits["train"] = take(order[held_out:])
    return {name: splits[name] for name in ("train", "val", "test")}


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0-1 scale, in chunks so CIFAR never needs a float copy."""
    total = np.zeros(images.shape[1])
    squares = np.zeros_like(total)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk] / 255
        total += block.sum(axis=(0, 2, 3))
        squares += np.square(block).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0))
    return mean.tolist(), std.tolist()


def describe(splits: dict[str, Split], cfg: DatasetConfig) -> dict[str, Any]:
    """The meta.json that DVC tracks and MLflow tags: what the tensors are, and their hashes."""
    per_split = {
        name: {
            "count": len(split.labels),
            "per_class": np.bincount(split.labels, minlength=len(cfg.classes)).tolist(),
            "sha256": split.sha256(),
        }
        for name, split in splits.items()
    }
    mean, std = channel_stats(splits["train"].images)
    combined = hashlib.sha256("".join(s["sha256"] for s in per_split.values()).encode())
    return {
        "dataset": cfg.name,
        "source": cfg.source,
        "shape": list(cfg.shape),
        "dtype": "uint8",
        "classes": list(cfg.classes),
        "split_seed": cfg.split_seed,
        "splits": per_split,
        "train_mean": mean,
        "train_std": std,
        "sha256": combined.hexdigest(),
    }


def preprocess(cfg: PrepareJob) -> Path:
    """Turn `data/raw/NAME` into `data/processed/NAME`; return the latter."""
    dataset = cfg.dataset
    raw_dir = cfg.paths.raw_dir(dataset.name)
    if not raw_dir.is_dir():
        raise PipelineError(
            f"no raw files for '{dataset.name}' in {raw_dir}: run "
            f"{data_command('fetch', raw_dir)} (or `dvc repro`) first"
        )
    if mismatches := checksum_mismatches(raw_dir, dataset.checksums):
        found = "; ".join(
            describe_mismatch(name, actual, dataset.checksums)
            for name, actual in mismatches.items()
        )
        raise PipelineError(
            f"the raw files of '{dataset.name}' in {raw_dir} are not those fetched ({found}): "
            f"run {data_command('fetch', raw_dir)} (or `dvc repro`) again"
        )
    on_disk = files_by_name(raw_dir)
    files = RawFiles((name, on_disk[name]) for name in dataset.checksums)
    raw = SOURCES[dataset.source](dataset, files)
    shape = tuple(raw.train_images.shape[1:])
    if shape != dataset.shape:
        raise PipelineError(
            f"'{dataset.name}' raw images are {shape}, but conf/dataset/{dataset.name}.yaml "
            f"declares channels/height/width = {dataset.shape}"
        )
    splits = make_splits(raw, dataset)
    target = cfg.paths.processed_dir(dataset.name)
    with atomic_directory(target) as staging:
        for name, split in splits.items():
            save_split(staging, name, split)
        write_meta(staging, describe(splits, dataset))
    counts = ", ".join(f"{name} {len(split.labels):,}" for name, split in splits.items())
    log.info("%s: %s images of %s -> %s", dataset.name, counts, dataset.shape, target)
    return target


@hydra_entry("data")
def main(cfg: DictConfig) -> None:
    preprocess(validate(cfg, PrepareJob))


if __name__ == "__main__":
    main()
