"""The GPU path in one run: `make gpu-check` (a few minutes on one GPU, offline).

Written for a bare GPU machine that has its own CUDA build of torch (what else it needs comes
as wheels: benchmarks/gpu_wheels.py). Each check goes through the pipeline's own configs and
training code, and fails loudly:
1. LeNet-5 on the digits data with `trainer=gpu`: bf16 mixed precision, batches on the GPU,
   test accuracy >= 98%;
2. the same with `trainer=ddp` on one GPU: an NCCL process group of world size 1, a training
   that learns (>= 95%: float32 on CUDA is not bit-reproducible, and runs of one seed differ by
   a few of the 360 test images);
3. the benchmark on the GPU: LeNet-5 on MNIST-shaped and AlexNet on CIFAR-shaped data, images/s
   of a plain loop and of the pipeline, eager and compiled, side by side (benchmarks/bench.py):
   whether `trainer.compile` pays there.
The report goes to stdout and, with --out, to a file; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from benchmarks.bench import training_table
from pipeline.cli import compose_config
from pipeline.config import PrepareJob, TrainJob
from pipeline.data.fetch import fetch
from pipeline.data.preprocess import preprocess
from pipeline.training.fit import train


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


def paths(directory: Path) -> list[str]:
    return [
        f"paths.data_dir={directory}/data",
        f"mlflow.tracking_uri=sqlite:///{directory}/mlflow.db",
    ]


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
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU (--device cpu: a dry run)")

    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    lines = [
        f"{device}; torch {torch.__version__}, Lightning {L.__version__}, "
        f"Python {platform.python_version()}"
    ]
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        data = compose_config("data", PrepareJob, ["dataset=digits", *paths(directory)[:1]])
        fetch(data)
        preprocess(data)
        accelerator = [] if cuda else ["trainer.accelerator=cpu", "trainer.precision=32-true"]
        runs = {
            "trainer=gpu": (
                ["trainer=gpu", *accelerator],
                {"batch device": "cuda:0", "precision": "bf16-mixed"} if cuda else {},
                0.98,
            ),
            "trainer=ddp, 1 GPU": (
                ["trainer=ddp", "trainer.devices=1", *accelerator],
                {"process group": "nccl x 1" if cuda else "gloo x 1", "strategy": "DDPStrategy"},
                0.95,
            ),
        }
        for name, (overrides, expected, min_accuracy) in runs.items():
            seen = digits_training(name.split(",")[0].replace("=", "-"), overrides, directory)
            problems += failures(name, seen, expected, min_accuracy)
            lines.append(
                f"LeNet-5 on digits, {name}: " + ", ".join(f"{k} {v}" for k, v in seen.items())
            )
        if dist.is_initialized():
            dist.destroy_process_group()
        for model in ("lenet5", "alexnet"):
            lines.append(training_table(model, args.device, args.images, 4, [128, 512], directory))
    lines.append("all checks passed" if not problems else "FAILED:\n" + "\n".join(problems))
    report = "\n\n".join(lines)
    print("\n" + report)
    if args.out:
        args.out.write_text(report + "\n")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
