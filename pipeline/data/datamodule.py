"""LightningDataModule over the preprocessed tensors: batches are slices, not samples.

MNIST- and CIFAR-sized data fits in memory (on the GPU too), so there is no DataLoader, no
worker process and no per-sample work: each batch is one index into the split's uint8
tensor. Normalisation and augmentation run later on whole batches on the training device
(`pipeline.augment`), as airbench does. Under DDP every rank takes its own shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pipeline.data.store import SPLITS, Split, load_split, read_meta


class Batches:
    """An epoch of (images, labels) batches sliced from in-memory tensors.

    With `shuffle`, each epoch draws a new permutation from `seed` and the epoch number, the
    same on every rank, so the ranks' shards (every `world_size`-th index from `rank`)
    partition the epoch, and a resumed run sees the order an uninterrupted one would. Like
    DistributedSampler, the order is padded with its first indices to a multiple of
    `world_size`: every rank takes the same number of batches, as DDP's all-reduce needs.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        self.images, self.labels = split.images, split.labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.shard_size = math.ceil(len(self.labels) / world_size)

    def __len__(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.labels.device
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch())
            order = torch.randperm(len(self.labels), generator=generator).to(device)
        else:
            order = torch.arange(len(self.labels), device=device)
        padding = self.shard_size * self.world_size - len(order)
        shard = torch.cat([order, order[:padding]])[self.rank :: self.world_size]
        for start in range(0, len(shard), self.batch_size):
            rows = shard[start : start + self.batch_size]
            yield self.images[rows], self.labels[rows]


class TensorDataModule(L.LightningDataModule):
    """The train/val/test splits written by `pipeline.data.preprocess`.

    The splits are read and verified when the module is made, on the CPU, so that missing or
    damaged data stops a training before it has started an MLflow run or written anything;
    `setup` moves them to the training's device.
    """

    def __init__(self, directory: str | Path, batch_size: int, eval_batch_size: int, seed: int):
        super().__init__()
        self.directory = Path(directory)
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.meta: dict[str, Any] = read_meta(self.directory)
        self.splits: dict[str, Split] = {name: load_split(self.directory, name) for name in SPLITS}

    def setup(self, stage: str | None = None) -> None:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        self.splits = {
            name: Split(*(t.to(device) for t in split)) for name, split in self.splits.items()
        }

    def _batches(self, name: str, batch_size: int, shuffle: bool = False) -> Batches:
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        return Batches(self.splits[name], batch_size, shuffle, self.seed, rank, world)

    def train_dataloader(self) -> Batches:
        return self._batches("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> Batches:
        return self._batches("val", self.eval_batch_size)

    def test_dataloader(self) -> Batches:
        return self._batches("test", self.eval_batch_size)
