"""Benchmark: `make bench` (python -m pipeline.bench [--device cuda]).

Measures what the pipeline's speed rests on, with the pipeline's own code, side by side with
the plainest PyTorch equivalent in the same process:
- loading a preprocessed split of MNIST's size (70,000 x 1 x 28 x 28 uint8) into memory;
- training LeNet-5 on MNIST-shaped data: the pipeline's path (Classifier + TensorDataModule
  + Lightning Trainer) against a hand-written loop over the same network, data, batch size,
  optimizer and threads. Images per second over whole epochs, after one warm-up epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from pipeline.cli import CONF_DIR
from pipeline.config import DatasetConfig, validate
from pipeline.data.datamodule import Batches, TensorDataModule
from pipeline.data.preprocess import describe
from pipeline.data.store import Split, load_split, read_meta, save_split, write_meta
from pipeline.models import build_model
from pipeline.train import TrainConfig, build_module

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


def pipeline_epochs(cfg: TrainConfig, directory: Path, epochs: int, device: str) -> float:
    """Images/s of `epochs` epochs through the pipeline's training path (after a warm-up)."""
    datamodule = TensorDataModule(directory, cfg.data.batch_size, cfg.data.eval_batch_size, 0)
    module = build_module(cfg, datamodule.meta)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs + 1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
        precision=cfg.trainer.precision,
    )
    trainer.fit(module, datamodule)
    images = len(datamodule.splits["train"].labels) * epochs
    return images / sum(timer.seconds[1:])


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)


def plain_epochs(cfg: TrainConfig, directory: Path, epochs: int, device: str) -> float:
    """Images/s of the same training written as a bare PyTorch loop."""
    torch.manual_seed(0)
    train = Split(*(t.to(device) for t in load_split(directory, "train")))
    network = build_model(cfg.model, cfg.dataset).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=cfg.optimizer.lr, momentum=0.9)
    meta = read_meta(directory)
    mean, std = meta["train_mean"][0] * 255, meta["train_std"][0] * 255
    seconds = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        for images, labels in Batches(train, cfg.data.batch_size, shuffle=True):
            loss = F.cross_entropy(network((images.float() - mean) / std), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return len(train.labels) * epochs / sum(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=20_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (plus one warm-up)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/pipeline runs")
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
            rates: dict[str, list[float]] = {"plain PyTorch loop": [], "pipeline": []}
            for _ in range(args.rounds):  # alternating: drifts in machine load hit both alike
                rates["plain PyTorch loop"].append(
                    plain_epochs(cfg, directory, args.epochs, args.device)
                )
                rates["pipeline"].append(pipeline_epochs(cfg, directory, args.epochs, args.device))
            report(rates, args, batch_size)


def report(rates: dict[str, list[float]], args: argparse.Namespace, batch_size: int) -> None:
    print(
        f"LeNet-5 training on {args.device} ({torch.get_num_threads()} threads, batch "
        f"{batch_size}, {args.images:,} images x {args.epochs} epochs, median of "
        f"{args.rounds} rounds):"
    )
    for name, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:<20} {statistics.median(values):10,.0f} images/s  (runs: {runs})")
    ratio = statistics.median(rates["pipeline"]) / statistics.median(rates["plain PyTorch loop"])
    print(f"  {'ratio':<20} {ratio:10.3f}", flush=True)


if __name__ == "__main__":
    main()
