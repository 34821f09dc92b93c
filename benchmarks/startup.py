"""Start-up of the entry points: `python -m benchmarks.startup` (part of `make bench`).

Each entry point runs as a user runs it, a new process from the shell, timed from its start to
its first work done, and divided by `python -c "import torch"` timed in the same round (absolute
times on a shared machine vary twofold between days; the ratio does not). Rounds alternate all
the commands, and the table gives each one's median ratio. First work: for the data stages,
their whole run on the offline digits; for a bad config, its rejection; for a training, its
first epoch's checkpoint (one step over the whole training split, then validation); for
evaluate and summary, their whole run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def timed(command: Sequence[str], status: int = 0) -> float:
    """Seconds `command` takes to exit with `status` (anything else is an error)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != status:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}")
    return seconds


def timed_until(command: Sequence[str], done: Path, limit_s: float = 600) -> float:
    """Seconds from starting `command` until `done` exists; the process is then stopped."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not done.exists():
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited {process.returncode} early")
            if time.perf_counter() - start > limit_s:
                raise RuntimeError(f"{' '.join(command)}: no {done} after {limit_s} s")
            time.sleep(0.02)
        return time.perf_counter() - start
    finally:
        process.kill()
        process.wait()


def one_round(directory: Path) -> dict[str, float]:
    """Seconds of each measurement, in a fresh `directory`."""
    data = [f"paths.data_dir={directory / 'data'}"]
    run_dir = directory / "run"
    training = [
        "experiment=digits",
        *data,
        "trainer.max_epochs=1",
        "data.batch_size=2048",  # above the 1,137 training images: one step
        f"hydra.run.dir={run_dir}",
        f"mlflow.tracking_uri=sqlite:///{directory / 'mlflow.db'}",
    ]
    steps: dict[str, Callable[[], float]] = {
        "import torch": lambda: timed([sys.executable, "-c", "import torch"]),
        "fetch + preprocess digits": lambda: (
            timed(module("pipeline.data.fetch", "dataset=digits", *data))
            + timed(module("pipeline.data.preprocess", "dataset=digits", *data))
        ),
        "train, bad group option (model=lenet6)": lambda: timed(
            module("pipeline.train", "model=lenet6"), status=1
        ),
        "train, bad value (model.head=mlp)": lambda: timed(
            module("pipeline.train", "model.head=mlp"), status=1
        ),
        "train, first step and validation": lambda: timed_until(
            module("pipeline.train", *training), run_dir / "checkpoints" / "last.ckpt"
        ),
        "evaluate (whole run)": lambda: timed(
            module("pipeline.evaluate", f"run_dir={run_dir}", *data)
        ),
        "summary (whole run)": lambda: timed(module("pipeline.summary")),
    }
    return {name: step() for name, step in steps.items()}


# the goals, as multiples of `import torch`
GOALS = {
    "fetch + preprocess digits": 1.3,
    "train, bad group option (model=lenet6)": 0.5,
    "train, bad value (model.head=mlp)": 0.5,
    "train, first step and validation": 2.0,
}


def report(rounds: list[dict[str, float]]) -> str:
    torch_s = statistics.median(r["import torch"] for r in rounds)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"start-up to first work, {len(rounds)} rounds (load average now {load}); "
        f"ratios to `python -c 'import torch'`, median {torch_s:.1f} s:",
        f"{'entry point':<40} {'median s':>9} {'x torch':>8} {'goal':>6}",
    ]
    for name in rounds[0]:
        if name == "import torch":
            continue
        ratio = statistics.median(r[name] / r["import torch"] for r in rounds)
        seconds = statistics.median(r[name] for r in rounds)
        goal = f"<={GOALS[name]}" if name in GOALS else ""
        lines.append(f"{name:<40} {seconds:>9.1f} {ratio:>8.2f} {goal:>6}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append(one_round(Path(tmp)))
    print(report(rounds))


if __name__ == "__main__":
    main()
