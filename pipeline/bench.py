"""Benchmark: `make bench` (python -m pipeline.bench [--device cuda]).

Measures what the pipeline's speed rests on, with the pipeline's own code, side by side with
the plainest PyTorch equivalent in the same process:
- loading a preprocessed split of MNIST's size (70,000 x 1 x 28 x 28 uint8) into memory;
- training LeNet-5 on MNIST-shaped data: the pipeline's path (Classifier, TensorDataModule,
  the Trainer of `pipeline.train` with its progress bar and MLflow logging) against a
  hand-written loop over the same network, data, batch size, optimizer and threads.

The two trainings alternate step by step in one process (a plain step runs at the end of
each of the pipeline's steps), so the jitter of a shared machine hits both alike; the
figures are totals over the epochs after a warm-up epoch. On a GPU each step ends with a
synchronisation, which the timing needs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import MLFlowLogger

from pipeline.cli import CONF_DIR
from pipeline.config import DatasetConfig, validate
from pipeline.data.datamodule import Batches, TensorDataModule
from pipeline.data.preprocess import describe
from pipeline.data.store import Split, load_split, read_meta, save_split, write_meta
from pipeline.models import build_model
from pipeline.train import TrainConfig, build_module, build_trainer

MNIST_SHAPE = (1, 28, 28)


def fake_split(count: int, seed: int = 0) -> Split:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, *MNIST_SHAPE), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, 10, (count,), generator=generator), torch.arange(count))


def bench_load(directory: Path, repeats: int = 5) -> list[float]:
    """Seconds to load a 70,000-image split written by the preprocess stage's writer."""
    split = fake_split(70_000)
    save_split(directory, "load", split)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = load_split(directory, "load")  # reads the whole file: no mmap
        times.append(time.perf_counter() - start)
    assert torch.equal(loaded.images, split.images)
    return times


def training_config(batch_size: int) -> TrainConfig:
    overrides = [f"data.batch_size={batch_size}", "model=lenet5", "dataset=mnist"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=overrides), TrainConfig)


def write_dataset(directory: Path, dataset: DatasetConfig, train: int) -> None:
    splits = {"train": fake_split(train), "val": fake_split(1000, 1), "test": fake_split(1000, 2)}
    for name, split in splits.items():
        save_split(directory, name, split)
    write_meta(directory, describe(splits, dataset))


class PlainLoop:
    """The same training as a bare PyTorch loop: network, SGD, normalisation and batches."""

    def __init__(self, cfg: TrainConfig, directory: Path, device: str) -> None:
        train = Split(*(t.to(device) for t in load_split(directory, "train")))
        self.network = build_model(cfg.model, cfg.dataset).to(device)
        self.optimizer = torch.optim.SGD(
            self.network.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum
        )
        meta = read_meta(directory)
        self.mean, self.std = meta["train_mean"][0] * 255, meta["train_std"][0] * 255
        epochs = (Batches(train, cfg.data.batch_size, shuffle=True) for _ in itertools.count())
        self.batches = itertools.chain.from_iterable(epochs)

    def step(self) -> None:
        images, labels = next(self.batches)
        loss = F.cross_entropy(self.network((images.float() - self.mean) / self.std), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Interleave(L.Callback):
    """Runs a plain-loop step after each of the pipeline's steps and adds up the time of each.

    A pipeline step is timed from the end of one plain step to the start of the next, so it
    holds everything Lightning does per batch (fetching, hooks, logging, progress bar).
    """

    def __init__(self, plain: PlainLoop) -> None:
        self.plain = plain
        self.seconds = {"pipeline": 0.0, "plain PyTorch loop": 0.0}
        self.images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:  # epoch 0 was the warm-up
            self.seconds = dict.fromkeys(self.seconds, 0.0)
            self.images = 0
        self.mark = self.now(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        start = self.now(pl_module.device)
        self.seconds["pipeline"] += start - self.mark
        self.plain.step()
        self.mark = self.now(pl_module.device)
        self.seconds["plain PyTorch loop"] += self.mark - start
        self.images += len(batch[1])

    @staticmethod
    def now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


def bench_training(cfg: TrainConfig, directory: Path, epochs: int, device: str) -> Interleave:
    """`epochs` epochs (after a warm-up one) of the pipeline, each step followed by a plain one."""
    datamodule = TensorDataModule(directory, cfg.data.batch_size, cfg.data.eval_batch_size, 0)
    interleave = Interleave(PlainLoop(cfg, directory, device))
    trainer = build_trainer(
        replace(cfg.trainer, accelerator=device, max_epochs=epochs + 1),
        directory,
        MLFlowLogger("bench", tracking_uri=f"sqlite:///{directory}/mlflow.db"),
        [interleave],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(build_module(cfg, datamodule.meta), datamodule)
    return interleave


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=20_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs (plus a warm-up)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        times = bench_load(directory)
        print(
            f"load 70,000 x 1 x 28 x 28 uint8 split: first {times[0] * 1e3:.1f} ms, "
            f"median {statistics.median(times) * 1e3:.1f} ms, best {min(times) * 1e3:.1f} ms"
        )
        for batch_size in args.batch_sizes:
            cfg = training_config(batch_size)
            write_dataset(directory, cfg.dataset, args.images)
            report(bench_training(cfg, directory, args.epochs, args.device), args, batch_size)


def report(interleave: Interleave, args: argparse.Namespace, batch_size: int) -> None:
    print(
        f"LeNet-5 training on {args.device} ({torch.get_num_threads()} threads, batch "
        f"{batch_size}, {interleave.images:,} images in {args.epochs} epochs, interleaved):"
    )
    rates = {name: interleave.images / s for name, s in interleave.seconds.items()}
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:10,.0f} images/s")
    ratio = rates["pipeline"] / rates["plain PyTorch loop"]
    print(f"  {'ratio':<20} {ratio:10.3f}", flush=True)


if __name__ == "__main__":
    main()
