"""The GPU path in one run: `make gpu-check` (several minutes on one GPU, offline).

Written for a bare GPU machine that has its own CUDA build of torch (what else it needs comes
as wheels: benchmarks/gpu_wheels.py). Each check goes through the pipeline's own configs and
training code, and fails loudly:
1. LeNet-5's digits recipe with `trainer=gpu` (bf16 mixed precision, batches on the GPU) and
   on the CPU, over the same seeds: the GPU's mean test accuracy on par with the CPU's, within
   3 standard errors of their difference (the seeds' own spread, measured here) or 0.5 points,
   whichever is wider; one seed's accuracy is a coin toss over 360 test images (the CPU
   recipe's seeds range over 2.5 points), so no check rests on one; and the same recipe with
   `trainer.cuda_graph=true` on par with `trainer=gpu`;
2. the same with `trainer=ddp` on one GPU: an NCCL process group of world size 1, a training
   that learns (>= 95%, 2 points under the CPU recipe's worst seed);
3. time to accuracy: `python -m pipeline.train experiment=digits trainer=gpu` from its start
   to a finished training, and how much of it went to start-up, fitting, testing, logging the
   model and evaluating (the run's time/* metrics);
4. the benchmark on the GPU: LeNet-5 on MNIST-shaped and AlexNet on CIFAR-shaped data, images/s
   of a plain loop, the minimal LightningModule and the pipeline, eager, compiled and with
   CUDA graphs, side by side, and the plain loop's whole step as one CUDA graph
   (benchmarks/bench.py).
Each line of the report goes to stdout and, with --out, to a file as soon as it is measured,
so a run cut short keeps what it measured. A check that raises is reported as failed, with the
end of its traceback, and the others still run (one GPU session may be all there is); the exit
status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from benchmarks.bench import graph_table, training_table
from pipeline.cli import compose_config
from pipeline.config import PrepareJob, TrainJob
from pipeline.data.fetch import fetch
from pipeline.data.preprocess import preprocess
from pipeline.tracking.store import read_run
from pipeline.training.fit import train

GRAPHED = "trainer=gpu trainer.cuda_graph=true"


class Report:
    """The check's lines, each printed and appended to `out` as it comes, and its problems."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.problems: list[str] = []
        if out:
            out.write_text("")

    def add(self, *lines: str) -> None:
        for line in lines:
            print(f"\n{line}", flush=True)
            if self.out:
                with self.out.open("a") as handle:
                    handle.write(f"{line}\n\n")

    @contextmanager
    def check(self, name: str) -> Iterator[None]:
        """Runs a check; one that raises is a problem, reported with its traceback's end."""
        try:
            yield
        except Exception as error:  # reported, so that the next check still runs
            self.problem(f"{name}: {type(error).__name__}: {error}")
            self.add(f"{name} raised:\n{''.join(traceback.format_exc().splitlines(True)[-12:])}")

    def problem(self, *problems: str) -> None:
        self.problems += problems


class Probe(L.Callback):
    """What a training really ran on, read at its first step."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.seen:
            return
        group = f"{dist.get_backend()} x {dist.get_world_size()}" if dist.is_initialized() else "-"
        self.seen = {
            "batch device": str(batch[0].device),
            "precision": str(trainer.precision),
            "strategy": type(trainer.strategy).__name__,
            "process group": group,
        }


def digits_training(name: str, overrides: list[str], directory: Path) -> dict[str, str]:
    """LeNet-5 on digits with `overrides`: what it ran on, its test accuracy and wall time."""
    cfg = compose_config("config", TrainJob, ["experiment=digits", *overrides, *paths(directory)])
    probe = Probe()
    start = time.perf_counter()
    metrics = train(cfg, directory / name, extra_callbacks=[probe])
    seconds = time.perf_counter() - start
    return {**probe.seen, "test/acc": f"{metrics['test/acc']:.4f}", "seconds": f"{seconds:.1f}"}


def on_par(first: list[float], second: list[float]) -> tuple[bool, str]:
    """Whether two recipes' accuracies over the same seeds have the same mean: their
    difference within 3 of its standard errors (from the seeds' spread) or 0.5 points."""
    difference = statistics.mean(first) - statistics.mean(second)
    error = math.sqrt(
        statistics.variance(first) / len(first) + statistics.variance(second) / len(second)
    )
    tolerance = max(0.005, 3 * error)
    said = (
        f"mean {statistics.mean(first):.4f} vs {statistics.mean(second):.4f}: "
        f"{difference * 100:+.2f} points, tolerance {tolerance * 100:.2f} "
        f"(3 standard errors {3 * error * 100:.2f}, floor 0.50)"
    )
    return abs(difference) <= tolerance, said


def accuracy_check(
    report: Report, directory: Path, cuda: bool, seeds: int, accelerator: list[str]
) -> None:
    """The digits recipe on the GPU against the CPU, seed by seed; a recipe that raises is
    reported and left out of the seeds after."""
    expected = {"batch device": "cuda:0", "precision": "bf16-mixed"} if cuda else {}
    recipes = {"trainer=gpu": ["trainer=gpu", *accelerator], "trainer=cpu": ["trainer=cpu"]}
    comparisons = [("trainer=gpu", "trainer=cpu")]
    if cuda:  # the config refuses CUDA graphs anywhere else
        recipes[GRAPHED] = ["trainer=gpu", "trainer.cuda_graph=true"]
        comparisons.append((GRAPHED, "trainer=gpu"))
    accuracy: dict[str, list[float]] = {recipe: [] for recipe in recipes}
    for seed in range(seeds):
        for recipe, overrides in recipes.items():
            if len(accuracy[recipe]) < seed:  # it raised before
                continue
            name = f"{recipe.replace('=', '-').replace(' ', '-')}-seed-{seed}"
            with report.check(f"LeNet-5 on digits, {recipe}, seed {seed}"):
                seen = digits_training(name, [*overrides, f"seed={seed}"], directory)
                if recipe != "trainer=cpu":
                    report.problem(*failures(f"{recipe}, seed {seed}", seen, expected, 0.95))
                accuracy[recipe].append(float(seen["test/acc"]))
                report.add(f"LeNet-5 on digits, {recipe}, seed {seed}: " + describe(seen))
    for recipe, reference in comparisons:
        if len(accuracy[recipe]) < 2 or len(accuracy[reference]) < 2:
            continue  # reported as raised
        same, said = on_par(accuracy[recipe], accuracy[reference])
        report.add(f"{recipe} against {reference} over {seeds} seeds: {said}")
        if not same:
            report.problem(f"{recipe} is not on par with {reference} on digits: {said}")


def time_to_accuracy(directory: Path, accelerator: list[str]) -> str:
    """How long `python -m pipeline.train experiment=digits trainer=gpu` takes to a finished
    training, and where that time goes."""
    run_dir = directory / "time-to-accuracy"
    command = [
        sys.executable,
        "-m",
        "pipeline.train",
        "experiment=digits",
        "trainer=gpu",
        *accelerator,
        *paths(directory),
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    run = MlflowClient(store(directory)).get_run(read_run(run_dir)["run_id"])
    phases = {
        key.removeprefix("time/").removesuffix("_s"): value
        for key, value in run.data.metrics.items()
        if key.startswith("time/")
    }
    parts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in phases.items())
    return (
        f"python {' '.join(command[1:5])}: {wall:.1f} s to a finished training (test accuracy "
        f"{run.data.metrics['test/acc']:.4f}): start-up and exit {wall - sum(phases.values()):.1f}"
        f" s, {parts}"
    )


def describe(seen: dict[str, str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in seen.items())


def paths(directory: Path) -> list[str]:
    return [f"paths.data_dir={directory}/data", f"mlflow.tracking_uri={store(directory)}"]


def store(directory: Path) -> str:
    return f"sqlite:///{directory}/mlflow.db"


def failures(
    name: str, seen: dict[str, str], expected: dict[str, str], min_accuracy: float
) -> list[str]:
    wrong = [
        f"{name}: {key} is {seen.get(key)}, not {value}"
        for key, value in expected.items()
        if seen.get(key) != value
    ]
    if float(seen["test/acc"]) < min_accuracy:
        wrong.append(f"{name}: test accuracy {seen['test/acc']} < {min_accuracy}")
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: dry run")
    parser.add_argument("--images", type=int, default=20_000, help="benchmark images per epoch")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of each digits recipe")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU (--device cpu: a dry run)")

    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    report = Report(args.out)
    report.add(
        f"{device}; torch {torch.__version__}, Lightning {L.__version__}, "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        data = compose_config("data", PrepareJob, ["dataset=digits", *paths(directory)[:1]])
        fetch(data)
        preprocess(data)
        accelerator = [] if cuda else ["trainer.accelerator=cpu", "trainer.precision=32-true"]
        accuracy_check(report, directory, cuda, args.seeds, accelerator)
        name = "trainer=ddp, 1 GPU"
        with report.check(name):
            overrides = ["trainer=ddp", "trainer.devices=1", *accelerator]
            seen = digits_training("trainer-ddp", overrides, directory)
            group = {"process group": "nccl x 1" if cuda else "gloo x 1", "strategy": "DDPStrategy"}
            report.problem(*failures(name, seen, group, 0.95))
            report.add(f"LeNet-5 on digits, {name}: " + describe(seen))
        if dist.is_initialized():
            dist.destroy_process_group()
        with report.check("time to accuracy"):
            report.add(time_to_accuracy(directory, accelerator))
        for model in ("lenet5", "alexnet"):
            timing = (model, args.device, args.images, 4, [128, 512], directory)
            with report.check(f"{model} benchmark"):
                report.add(training_table(*timing))
            if cuda:
                with report.check(f"{model} benchmark with CUDA graphs"):
                    report.add(graph_table(*timing))
    problems = report.problems
    report.add("all checks passed" if not problems else "FAILED:\n" + "\n".join(problems))
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
