"""Benchmark: `make bench` (python -m benchmarks.bench [--device cuda] [--model alexnet]).

Measures what the pipeline's speed rests on, with the pipeline's own code, side by side with
the plainest PyTorch equivalent in the same process:
- loading a preprocessed split of MNIST's size (70,000 x 1 x 28 x 28 uint8) into memory;
- training LeNet-5 on MNIST-shaped data (or AlexNet on CIFAR-shaped data, as the DVC grid
  trains it): `pipeline.training.fit.train` itself (its Trainer, callbacks, progress bar and
  MLflow run, in a temporary sqlite store), eager and compiled (`trainer.compile=true`), and
  the same network as the plainest LightningModule (what Lightning alone costs), each against
  a hand-written eager loop over the same network, data, batch size, optimizer and threads.

Each training alternates with the plain loop step by step in one process (a plain step runs
at the end of each of the training's steps), so the jitter of a shared machine hits both
alike; the figures are totals over the epochs after a warm-up epoch, validation and
checkpointing left out. Compiling happens in the warm-up epoch: its compile time is what that
epoch's steps took beyond the steady state's pace. On a GPU each step ends with a
synchronisation, which the timing needs. `python -m benchmarks.startup` times the entry
points' start-up.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from pipeline.cli import compose_config
from pipeline.config import TrainJob
from pipeline.data.datamodule import Batches
from pipeline.data.preprocess import describe
from pipeline.data.store import Split, load_split, read_meta, save_split, write_meta
from pipeline.models import build_model
from pipeline.training.fit import open_data, train
from pipeline.training.graphs import GraphedSteps
from pipeline.training.optim import build_optimizer

# the trainings it times, as params.yaml's grid trains them: the dataset each trains on (its
# shape: the data are random) and the model's overrides
MODELS = {
    "lenet5": ("mnist", ["model=lenet5"]),
    "alexnet": ("cifar10", ["model=alexnet", "model.width=0.5"]),
}
MNIST_SHAPE = (1, 28, 28)


def fake_split(count: int, seed: int = 0, shape: tuple[int, ...] = MNIST_SHAPE) -> Split:
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 256, (count, *shape), dtype=np.uint8)
    return Split(images, generator.integers(0, 10, count), np.arange(count))


def bench_load(directory: Path, repeats: int = 5) -> list[float]:
    """Seconds to load a 70,000-image split written by the preprocess stage's writer."""
    split = fake_split(70_000)
    save_split(directory, "load", split)
    # what preprocess records: the load checks each split against its sha256
    write_meta(directory, {"splits": {"load": {"sha256": split.sha256()}}})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = load_split(directory, "load")  # reads the whole file: no mmap
        times.append(time.perf_counter() - start)
    np.testing.assert_array_equal(loaded.images.numpy(), split.images)
    return times


def training_config(
    model: str,
    batch_size: int,
    directory: Path,
    epochs: int,
    device: str,
    compile: bool = False,
    cuda_graph: bool = False,
) -> TrainJob:
    """The training of `model` (a key of MODELS), `epochs` epochs after a warm-up one, all files
    in `directory`."""
    dataset, model_overrides = MODELS[model]
    overrides = [
        *model_overrides,
        f"dataset={dataset}",
        f"trainer.compile={compile}",
        f"trainer.cuda_graph={cuda_graph}",
        "dataset.val_size=1000",
        f"data.batch_size={batch_size}",
        f"paths.data_dir={directory}",
        f"trainer.accelerator={device}",
        # as trainer=gpu trains: CUDA's pooling backward has no deterministic kernel
        "trainer.deterministic=false",
        f"trainer.max_epochs={epochs + 1}",
        "train.evaluate=false",
        f"mlflow.tracking_uri=sqlite:///{directory}/mlflow.db",
        "mlflow.experiment=bench",
    ]
    return compose_config("config", TrainJob, overrides)


def write_dataset(cfg: TrainJob, train_images: int) -> None:
    """Random data of the dataset's shape where the config's training reads it."""
    directory = cfg.paths.processed_dir(cfg.dataset.name)
    directory.mkdir(parents=True, exist_ok=True)
    shape = cfg.dataset.shape
    splits = {
        "train": fake_split(train_images, 0, shape),
        "val": fake_split(cfg.dataset.val_size, 1, shape),
        "test": fake_split(1000, 2, shape),
    }
    for name, split in splits.items():
        save_split(directory, name, split)
    write_meta(directory, describe(splits, cfg.dataset))


def normalisation(cfg: TrainJob, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's mean and std in 0-255 pixels, shaped to broadcast over batches."""
    meta = read_meta(cfg.paths.processed_dir(cfg.dataset.name))
    return tuple(  # type: ignore[return-value]
        torch.tensor(meta[key], device=device).view(1, -1, 1, 1) * 255
        for key in ("train_mean", "train_std")
    )


def normalised_loss(
    network: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """The cross-entropy of `network` on uint8 `images`, normalised as the pipeline does."""
    return F.cross_entropy(network((images.float() - mean) / std), labels)


class PlainLoop:
    """The same training as a bare PyTorch loop: network, optimizer, normalisation, batches."""

    def __init__(self, cfg: TrainJob) -> None:
        device = cfg.trainer.accelerator
        directory = cfg.paths.processed_dir(cfg.dataset.name)
        split = Split(*(t.to(device) for t in load_split(directory, "train")))
        self.network = build_model(cfg.model, cfg.dataset).to(device)
        self.optimizer = build_optimizer(self.network.parameters(), cfg.optimizer)
        self.mean, self.std = normalisation(cfg, device)
        epochs = (Batches(split, cfg.data.batch_size, shuffle=True) for _ in itertools.count())
        self.batches = itertools.chain.from_iterable(epochs)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return normalised_loss(self.network, images, labels, self.mean, self.std)

    def step(self) -> int:
        """One training step; returns its images."""
        images, labels = next(self.batches)
        self.train_on(images, labels)
        return len(labels)

    def train_on(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.loss(images, labels)
        loss.backward()
        self.optimizer.step()
        return loss


class GraphedLoop(PlainLoop):
    """The plain loop with its whole step (forward, backward, optimizer step) as one CUDA
    graph per batch shape, captured as the pipeline's `trainer.cuda_graph` captures its own:
    the floor a step of this network reaches on a GPU, with no launch cost per kernel."""

    def __init__(self, cfg: TrainJob) -> None:
        super().__init__(cfg)
        # its warm-up steps the optimizer too: a benchmark's weights need no care
        self.graphed = GraphedSteps(
            lambda images, labels, _height: self.train_on(images, labels), self.network
        )

    def step(self) -> int:
        images, labels = next(self.batches)
        self.graphed(images, labels, images.shape[-2])
        return len(labels)


def graph_floor(cfg: TrainJob, steps: int = 300) -> tuple[float, float]:
    """Images/s of the plain eager loop and of its whole step as one CUDA graph, alternating
    step by step, each step timed to its end (a synchronisation), as the trainings are."""
    loops = {"plain": PlainLoop(cfg), "graph": GraphedLoop(cfg)}
    seconds, images = dict.fromkeys(loops, 0.0), dict.fromkeys(loops, 0)
    for _ in range(steps):
        for name, loop in loops.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            images[name] += loop.step()
            torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
    return images["plain"] / seconds["plain"], images["graph"] / seconds["graph"]


class MinimalModule(L.LightningModule):
    """The same training as the plainest LightningModule, under a Trainer with nothing on
    (no logger, checkpoints, progress bar or validation): what Lightning itself costs a step,
    so that the pipeline's own cost is the rest."""

    def __init__(self, cfg: TrainJob) -> None:
        super().__init__()
        self.network = build_model(cfg.model, cfg.dataset)
        self.optimizer_cfg = cfg.optimizer
        mean, std = normalisation(cfg, "cpu")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return normalised_loss(self.network, *batch, self.mean, self.std)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.parameters(), self.optimizer_cfg)


# the warm-up epoch's step whose operators are counted: past the first (compiling), and not
# one that logs
PROFILED_STEP = 1


class Interleave(L.Callback):
    """Runs a plain-loop step after each step of the training it is a callback of (the
    pipeline's, or the MinimalModule's) and adds up the time of each.

    A training step is timed from the end of one plain step to the start of the next, so it
    holds everything Lightning does per batch (fetching, hooks, logging, progress bar). One
    step of the warm-up epoch is profiled instead of timed: the operators it dispatches (on a
    GPU, one kernel launch or more each, what a small network's step is bound by), counted
    free of the machine's jitter.
    """

    def __init__(self, plain: PlainLoop) -> None:
        self.plain = plain
        self.seconds = {"training": 0.0, "plain": 0.0}
        self.images = 0
        self.warmup = (0.0, 0)  # the warm-up epoch's training seconds and images
        self.operators = 0  # torch operators (aten::) the profiled step dispatched
        self.profiler: profile | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:  # epoch 0 was the warm-up
            self.warmup = (self.seconds["training"], self.images)
            self.seconds = dict.fromkeys(self.seconds, 0.0)
            self.images = 0
        self.mark = self.now(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == 0 and batch_idx == PROFILED_STEP:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        start = self.now(pl_module.device)
        if self.profiler is None:
            self.seconds["training"] += start - self.mark
            self.images += len(batch[1])
        else:  # profiled, not timed
            self.profiler.stop()
            events = self.profiler.key_averages()
            self.operators = sum(e.count for e in events if e.key.startswith("aten::"))
            self.profiler = None
        self.plain.step()
        self.mark = self.now(pl_module.device)
        self.seconds["plain"] += self.mark - start

    @staticmethod
    def now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def rate(self, side: str) -> float:
        """Steady-state images/s of the training or of the plain loop."""
        return self.images / self.seconds[side]

    def pace(self) -> float:
        """The training's images/s over its interleaved plain loop's."""
        return self.rate("training") / self.rate("plain")

    def warmup_excess(self) -> float:
        """Seconds the warm-up epoch's steps took beyond the steady pace: compiling, mostly."""
        seconds, images = self.warmup
        return seconds - images / self.rate("training")


def bench_training(cfg: TrainJob, output_dir: Path) -> Interleave:
    """The training of `cfg`, each of its steps followed by a plain one."""
    interleave = Interleave(PlainLoop(cfg))
    train(cfg, output_dir, extra_callbacks=[interleave])
    return interleave


def bench_minimal(cfg: TrainJob, output_dir: Path) -> Interleave:
    """`cfg`'s network, data and optimizer as a MinimalModule, each of its steps followed by
    a plain one."""
    L.seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")  # as `train` sets it, for both sides alike
    interleave = Interleave(PlainLoop(cfg))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        max_epochs=cfg.trainer.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[interleave],
        default_root_dir=output_dir,
    )
    trainer.fit(MinimalModule(cfg), open_data(cfg))
    return interleave


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["lenet5"])
    parser.add_argument("--images", type=int, default=20_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs (plus a warm-up)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        times = bench_load(directory)
        tables = []
        for model in args.models:
            timing = (model, args.device, args.images, args.epochs, args.batch_sizes, directory)
            tables.append(training_table(*timing))
            if args.device == "cuda":
                tables.append(graph_table(*timing))
    print(  # after the trainings' own output
        f"\nload 70,000 x 1 x 28 x 28 uint8 split: median {statistics.median(times) * 1e3:.1f} ms "
        f"(first {times[0] * 1e3:.1f} ms, best {min(times) * 1e3:.1f} ms)"
    )
    print("\n\n".join(tables))


# the trainings timed at each batch size, each interleaved with its own plain loop
SIDES = ("minimal", "eager", "compiled")


def timed_trainings(
    model: str,
    device: str,
    images: int,
    epochs: int,
    batch_sizes: list[int],
    directory: Path,
    sides: tuple[str, ...],
) -> dict[int, dict[str, Interleave]]:
    """`model`'s trainings at each batch size: each of `sides` (a MinimalModule, the pipeline
    eager, compiled, or with CUDA graphs), each interleaved with its own plain loop."""
    timed: dict[int, dict[str, Interleave]] = {}
    for batch_size in batch_sizes:
        for side in sides:
            cfg = training_config(
                model, batch_size, directory, epochs, device, side == "compiled", side == "graphed"
            )
            write_dataset(cfg, images)
            run_dir = directory / f"{model}-batch-{batch_size}-{side}"
            bench = bench_minimal if side == "minimal" else bench_training
            timed.setdefault(batch_size, {})[side] = bench(cfg, run_dir)
    return timed


def training_table(
    model: str, device: str, images: int, epochs: int, batch_sizes: list[int], directory: Path
) -> str:
    """Times `model`'s training as a MinimalModule and as the pipeline's, eager and compiled,
    at each batch size; returns `report`."""
    timed = timed_trainings(model, device, images, epochs, batch_sizes, directory, SIDES)
    return report(f"{model} on {MODELS[model][0]}-shaped data", timed, device, epochs, images)


def graph_table(
    model: str, device: str, images: int, epochs: int, batch_sizes: list[int], directory: Path
) -> str:
    """On a GPU: images/s of the pipeline's training with CUDA graphs and of the plain loop's
    whole step as one graph, each against a plain eager loop, at each batch size."""
    timed = timed_trainings(model, device, images, epochs, batch_sizes, directory, ("graphed",))
    lines = [
        f"{model}: whole steps as CUDA graphs, the pipeline's (trainer.cuda_graph=true, against "
        "its interleaved plain eager loop) and the plain loop's (alternating with the eager one):"
    ]
    for batch_size in batch_sizes:
        graphed = timed[batch_size]["graphed"]
        eager, graph = graph_floor(training_config(model, batch_size, directory, epochs, device))
        lines.append(
            f"{batch_size:>6} pipeline {graphed.rate('training'):>9,.0f} img/s "
            f"({graphed.pace():.2f} x plain eager, {graphed.operators} operators a step); "
            f"plain loop {graph:>9,.0f} img/s "
            f"({graph / eager:.2f} x plain eager)"
        )
    return "\n".join(lines)


def report(
    what: str, timed: dict[int, dict[str, Interleave]], device: str, epochs: int, images: int
) -> str:
    """Images/s per batch size of the plain eager loop (over all the trainings' plain steps),
    the minimal LightningModule, the pipeline eager and compiled (each `x plain`: to the plain
    steps interleaved with it), the pipeline eager to the minimal module (`x minimal`: the
    pipeline's own cost), and the compiled training's compile time; then the operators one
    step of each training dispatches."""
    lines = [
        f"{what}, training on {device}, {torch.get_num_threads()} threads, {epochs} timed epochs "
        f"of {images:,} images, interleaved step by step with a plain eager loop:",
        f"{'batch':>6} {'plain img/s':>12} {'minimal':>9} {'x plain':>8} {'pipeline':>9} "
        f"{'x plain':>8} {'x minimal':>10} {'compiled':>9} {'x plain':>8} {'compile s':>10}",
    ]
    for batch_size, runs in timed.items():
        plain = sum(r.images for r in runs.values()) / sum(
            r.seconds["plain"] for r in runs.values()
        )
        minimal, eager, compiled = (runs[side] for side in SIDES)
        lines.append(
            f"{batch_size:>6} {plain:>12,.0f} {minimal.rate('training'):>9,.0f} "
            f"{minimal.pace():>8.2f} {eager.rate('training'):>9,.0f} {eager.pace():>8.2f} "
            f"{eager.pace() / minimal.pace():>10.2f} {compiled.rate('training'):>9,.0f} "
            f"{compiled.pace():>8.2f} {compiled.warmup_excess():>10.1f}"
        )
    counts = "; ".join(
        f"batch {batch_size}: " + ", ".join(f"{side} {runs[side].operators}" for side in SIDES)
        for batch_size, runs in timed.items()
    )
    lines.append(f"torch operators dispatched by one training step (torch.profiler): {counts}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
