"""Benchmark: `make bench-search` (python -m benchmarks.search [--trials N] [--epochs N]).

The digits search (conf/hparams_search/digits_optuna.yaml: learning rate, momentum, weight
decay, batch size and head), 24 trials of 30 epochs, TPE seed 0, run twice in one go, each
a real `python -m pipeline.train -m` with two trials at a time (joblib), into a study and an
MLflow store of its own: without pruning, then with the median pruner (the default). The
table: wall time, epochs trained (every trial's reported epochs, from the study) and the best
val/acc either search found.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from pipeline.cli import compose_config
from pipeline.config import PrepareJob
from pipeline.data.fetch import fetch
from pipeline.data.preprocess import preprocess

PRUNERS = ("none", "median")


def search(workdir: Path, data_dir: Path, pruner: str, trials: int, epochs: int) -> dict:
    """One search into `workdir`; its wall time, epochs trained, best value and trial states."""
    workdir.mkdir()
    command = [
        sys.executable, "-m", "pipeline.train", "-m",
        "hparams_search=digits_optuna",
        f"hydra/sweeper/pruner={pruner}",
        f"hydra.sweeper.n_trials={trials}",
        f"trainer.max_epochs={epochs}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"paths.data_dir={data_dir}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        f"hydra.sweep.dir={workdir / 'sweep'}",
        "evaluation.scales=[1.0]",
    ]  # fmt: skip
    start = time.monotonic()
    with (workdir / "search.log").open("w") as log:
        subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.monotonic() - start
    study = optuna.load_study(
        study_name="digits-digits_optuna", storage=f"sqlite:///{workdir / 'optuna.db'}"
    )
    states = [t.state.name for t in study.trials]
    return {
        "seconds": seconds,
        "epochs": sum(len(t.intermediate_values) for t in study.trials),
        "best": study.best_value,
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "data"
        stage = compose_config("data", PrepareJob, ["dataset=digits", f"paths.data_dir={data_dir}"])
        fetch(stage)
        preprocess(stage)
        results = {}
        for pruner in PRUNERS:
            print(f"searching with pruner={pruner} ...", flush=True)
            workdir = Path(scratch) / pruner
            results[pruner] = search(workdir, data_dir, pruner, args.trials, args.epochs)
    print(table(results, args.trials, args.epochs))


def table(results: dict[str, dict], trials: int, epochs: int) -> str:
    base = results["none"]
    lines = [
        f"digits search, {trials} trials x {epochs} epochs, TPE seed 0, 2 trials at a time",
        f"{'pruner':<8} {'wall s':>8} {'epochs':>7} {'best val/acc':>13} {'pruned':>7} "
        f"{'failed':>7}",
    ]
    for pruner, result in results.items():
        lines.append(
            f"{pruner:<8} {result['seconds']:>8.0f} {result['epochs']:>7} {result['best']:>13.4f} "
            f"{result['pruned']:>7} {result['failed']:>7}"
        )
    pruned = results["median"]
    lines.append(
        f"median / none: wall {pruned['seconds'] / base['seconds']:.2f}x, epochs "
        f"{pruned['epochs'] / base['epochs']:.2f}x, best val/acc "
        f"{100 * (pruned['best'] - base['best']):+.2f} points"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
