"""MLflow: the run of a training, its params, tags and artifacts, all from rank 0.

Lightning's MLFlowLogger owns the run (it creates it lazily, on rank 0 only) and writes each
metric as it is logged (every `log_every_n_steps` steps and once an epoch), so a checkpoint never
holds state the store lacks. `RunRecorder` adds what a person looks for in the UI (the resolved
config as params and as YAML, the git commit and the data checksum as tags, the data splits as
dataset inputs, the architecture summary), and leaves `run.json` in the output directory, so
that `evaluate` and a resumed training find the same run. `SystemMetrics` samples the machine
while the training fits.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import numpy as np
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

from pipeline.config import mask_password
from pipeline.data.store import SPLITS, split_path
from pipeline.tracking.store import (
    RUN_FILE,
    artifact_location,
    credentials_to_environment,
    use_tracking_uri,
)

# model training, as opposed to GenAI: the UI shows such an experiment's runs, models, datasets
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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


def dataset_inputs(meta: Mapping[str, Any], directory: Path) -> list[DatasetInput]:
    """The preprocessed splits as a run's dataset inputs (the runs table's Dataset column and
    the UI's lineage): context train/val/test, source the split's file, digest the sha256 that
    preprocessing recorded, cut to the 36 characters MLflow stores (the full one is in the
    profile and in the run's `data_sha256` tag)."""
    features = Schema([TensorSpec(np.dtype(np.uint8), (-1, *meta["shape"]), "images")])
    targets = Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    schema = json.dumps(TensorDatasetSchema(features, targets).to_dict())
    inputs = []
    for split in SPLITS:
        info = meta["splits"][split]
        dataset = Dataset(
            name=f"{meta['dataset']}-{split}",
            digest=info["sha256"][:MAX_DATASET_DIGEST_SIZE],
            source_type="local",
            source=json.dumps({"uri": str(split_path(directory, split).resolve())}),
            schema=schema,
            profile=json.dumps({"num_rows": info["count"], "sha256": info["sha256"]}),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return inputs


def ended_status(status: str) -> str:
    """MLflow's status for a run that ends while handling the current exception, if any: KILLED
    when its user pressed Ctrl-C (Lightning says "failed" for every interruption)."""
    return "KILLED" if isinstance(sys.exception(), KeyboardInterrupt) else status


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, which ends a run stopped by Ctrl-C as KILLED."""

    def finalize(self, status: str = "success") -> None:
        super().finalize(ended_status(status))


def run_logger(
    experiment: str, name: str, tracking_uri: str, run_id: str | None, tags: Mapping[str, str]
) -> MLFlowLogger:
    """The training's logger: a new run named `name` with `tags`, or run `run_id` resumed."""
    return RunLogger(
        experiment_name=experiment,
        run_name=name,
        tracking_uri=credentials_to_environment(tracking_uri),
        artifact_location=artifact_location(tracking_uri, experiment),
        run_id=run_id,
        tags=dict(tags),
    )


class RunRecorder:
    """Logs params, tags and config/summary artifacts once, on rank 0 before fitting: before
    DDP's ranks meet, so that a training whose ranks never meet still has its run, FAILED."""

    def __init__(
        self,
        config: Mapping[str, Any],
        summary: str,
        tags: Mapping[str, str],
        datasets: list[DatasetInput],
        output_dir: Path,
        resumed: Mapping[str, str] | None,
    ) -> None:
        """`config`: the training's resolved config as plain values; `resumed`: None for a new
        run, else the tags the resume adds to its run (what it changed on purpose)."""
        uri = mask_password(config["mlflow"]["tracking_uri"])
        self.config = {**config, "mlflow": {**config["mlflow"], "tracking_uri": uri}}
        self.summary = summary
        self.tags, self.datasets = tags, datasets
        self.output_dir, self.resumed = output_dir, resumed

    def start(self, logger: MLFlowLogger) -> None:
        """Create (or reopen) the run and record the training in it."""
        client, run_id = logger.experiment, logger.run_id
        run = {"run_id": run_id, "tracking_uri": self.config["mlflow"]["tracking_uri"]}
        (self.output_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
        if self.resumed is not None:
            # running again: an interrupted start may have ended it (Lightning ends a run as
            # FAILED when SLURM stops the job with SIGTERM); its params are already there
            client.update_run(run_id, status="RUNNING")
            for key, value in self.resumed.items():
                client.set_tag(run_id, key, value)
            return
        logger.log_hyperparams(dict(flatten(self.config)))
        for key, value in self.tags.items():
            client.set_tag(run_id, key, value)
        client.log_text(run_id, yaml.safe_dump(self.config, sort_keys=False), "config.yaml")
        client.log_text(run_id, self.summary, "summary.txt")
        client.log_inputs(run_id, self.datasets)
        client.set_experiment_tag(logger.experiment_id, *EXPERIMENT_KIND)


class SystemMetrics(L.Callback):
    """The machine's CPU, memory, disk, network and NVIDIA GPU use while fitting, as the run's
    system/* metrics: MLflow's own monitor, a thread on rank 0 that takes a sample every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default, 10, keeps its cost near
    0.1% of a core: a sample and its write take about 10 ms of CPU). It runs while the run is
    MLflow's active run, from fit start to fit end."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        assert isinstance(trainer.logger, MLFlowLogger)
        self.run_id = trainer.logger.run_id
        use_tracking_uri(self.tracking_uri)
        mlflow.start_run(self.run_id, log_system_metrics=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop("FINISHED")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.stop(ended_status("FAILED"))

    def stop(self, status: str) -> None:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)


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
