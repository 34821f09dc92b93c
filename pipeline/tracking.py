"""MLflow: run names, params, tags and artifacts of a training, all from rank 0.

Lightning's MLFlowLogger owns the run (it creates it lazily, on rank 0 only); `RunLogger`, a
subclass, writes its metrics in batches; `RunRecorder` adds what a person looks for in the UI:
the resolved config as params and as YAML, the git commit and the data checksum as tags, and
the architecture summary.
It also leaves `run.json` in the output directory, so `evaluate` and a resumed training find
the same run.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric

RUN_FILE = "run.json"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """('a.b.c', 'value') pairs of a nested config: MLflow params are flat strings."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, str(value)


def git_commit(directory: Path) -> str:
    """HEAD's hash, with '-dirty' when tracked files differ from it; 'unknown' outside git."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_name(backbone: str, head: str, dataset: str) -> str:
    return f"{backbone}-{head}-{dataset}-{uuid.uuid4().hex[:6]}"


def read_run(output_dir: Path) -> dict[str, str]:
    return json.loads((output_dir / RUN_FILE).read_text())


class RunLogger(MLFlowLogger):
    """MLFlowLogger whose metrics wait in memory and reach MLflow in one write per flush.

    Each write to the sqlite store costs ~8 ms of CPU (several SQLAlchemy queries), and
    writing train/loss_step every 50 steps took LeNet ~2% of its speed on 2 CPU cores
    (`make bench`). Metrics go out every `flush_seconds` at most, when the run ends, and
    whenever `flush` is called: RunRecorder calls it before each checkpoint is written, so a
    resumed run holds every metric logged up to its checkpoint. A killed process loses what
    it logged after its last checkpoint, which resuming logs again.
    """

    def __init__(self, *args: Any, flush_seconds: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flush_seconds = flush_seconds
        self._pending: list[Metric] = []
        self._flush_at = time.monotonic() + flush_seconds

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items()]
        if time.monotonic() >= self._flush_at:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        for start in range(0, len(self._pending), 1000):  # MLflow's limit per call
            batch = self._pending[start : start + 1000]
            self.experiment.log_batch(self.run_id, metrics=batch, **self._log_batch_kwargs)
        self._pending = []
        self._flush_at = time.monotonic() + self.flush_seconds

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.flush()
        super().finalize(status)


class RunRecorder(L.Callback):
    """Logs params, tags and config/summary artifacts once, when fitting starts on rank 0, and
    has the logger write its metrics before each checkpoint and as each training epoch starts
    (the previous epoch's training metrics are logged after its checkpoint)."""

    def __init__(
        self,
        params: Mapping[str, Any],
        config_yaml: str,
        summary: str,
        tags: Mapping[str, str],
        output_dir: Path,
        tracking_uri: str,
        resumed: bool,
    ) -> None:
        self.params, self.config_yaml, self.summary = params, config_yaml, summary
        self.tags, self.output_dir, self.resumed = tags, output_dir, resumed
        self.tracking_uri = tracking_uri

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logger = trainer.logger
        assert isinstance(logger, MLFlowLogger)
        client, run_id = logger.experiment, logger.run_id
        run = {"run_id": run_id, "tracking_uri": self.tracking_uri}
        (self.output_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
        if self.resumed:  # params are immutable in MLflow and already there
            return
        logger.log_hyperparams(dict(flatten(self.params)))
        for key, value in self.tags.items():
            client.set_tag(run_id, key, value)
        client.log_text(run_id, self.config_yaml, "config.yaml")
        client.log_text(run_id, self.summary, "summary.txt")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, _: Any) -> None:
        self.flush(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    @staticmethod
    def flush(trainer: L.Trainer) -> None:
        logger = trainer.logger
        assert isinstance(logger, RunLogger)
        logger.flush()


class EpochHistory(L.Callback):
    """Writes history.csv (epoch, losses, accuracies, learning rate, seconds so far), one row
    per epoch on rank 0: the training curves `dvc plots show` draws."""

    columns = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "elapsed_s")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics

        def value(name: str) -> float:
            return float(metrics[name]) if name in metrics else math.nan

        row = {
            "epoch": trainer.current_epoch,
            "train_loss": value("train/loss_epoch"),
            "train_acc": value("train/acc"),
            "val_loss": value("val/loss"),
            "val_acc": value("val/acc"),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "elapsed_s": round(time.monotonic() - self.start, 2),
        }
        fresh = not self.path.exists() or trainer.current_epoch == 0
        with self.path.open("w" if fresh else "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            if fresh:
                writer.writeheader()
            writer.writerow(row)
