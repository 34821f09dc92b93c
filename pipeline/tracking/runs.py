"""MLflow: the run of a training, owned from start to end by one `TrainingRun` on rank 0.

It creates (or resumes) the run, records the training in it (the resolved config as params,
the git commit and data checksum as tags, the data splits as dataset inputs, the config and
architecture summary as artifacts), is the run Lightning's logger writes each metric into as it
is logged (so a checkpoint never holds state the store lacks), logs the best checkpoint, the
model and the evaluation, and alone ends it. Lightning-free: `evaluate` reopens a finished
training's run through it without importing Lightning.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

from pipeline.config import mask_password
from pipeline.data.store import SPLITS, split_path
from pipeline.errors import PipelineError
from pipeline.tracking.preflight import check_store
from pipeline.tracking.store import RUN_FILE, experiment_id, read_run, tracking_client

# model training, as opposed to GenAI: read by MLflow UIs before 3.x's workflow switch (3.17's
# UI opens the view its address names: `make ui` prints it)
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
    """A training's name when it has none: its dataset and model in the form of DVC's run keys
    (digits-lenet5_gap), then an id of its own."""
    return f"{dataset}-{backbone}_{head}-{uuid.uuid4().hex[:6]}"


def size_metric(size: int) -> str:
    """The name of the test accuracy at inputs of `size` px: one metric per size."""
    return f"test/acc_{size}px"


def by_size(metrics: Mapping[str, float]) -> dict[int, float]:
    """Input size -> test accuracy, from a run's or a model's metrics (`size_metric`'s)."""
    found = {}
    for key, value in metrics.items():
        number = re.search(r"\d+", key)
        if number and key == size_metric(int(number[0])):
            found[int(number[0])] = value
    return dict(sorted(found.items()))


def recorded_params(config: Mapping[str, Any]) -> list[Param]:
    """The config's set values as params: not its nulls, nor where the run is recorded (the
    store's URI, the run's own address; config.yaml keeps it, masked)."""
    return [
        Param(key, value)
        for key, value in flatten(config)
        if value != "None" and key != "mlflow.tracking_uri"
    ]


def split_dataset(dataset: str, split: str, sha256: str) -> tuple[str, str]:
    """(name, digest) of a preprocessed split as MLflow records it: a run's inputs, and the
    dataset its evaluation metrics name."""
    return f"{dataset}-{split}", sha256[:MAX_DATASET_DIGEST_SIZE]


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
        name, digest = split_dataset(meta["dataset"], split, info["sha256"])
        dataset = Dataset(
            name=name,
            digest=digest,
            source_type="local",
            source=json.dumps({"uri": str(split_path(directory, split).resolve())}),
            schema=schema,
            profile=json.dumps({"num_rows": info["count"], "sha256": info["sha256"]}),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return inputs


class TrainingRun:
    """The MLflow run of one training, and its one writer, from start to end.

    Rank 0's process creates the run (or resumes it: the same run id), records the training
    in it, keeps it MLflow's active run while it lasts (MLflow samples the machine into its
    system/* metrics meanwhile, and `mlflow.pyfunc.log_model` logs into it), gives Lightning's
    logger its id to write metrics into, logs artifacts and metrics, and alone sets its status:
    as a context manager it ends the run FINISHED, FAILED on an exception, KILLED on Ctrl-C,
    unless the training ended it already (`end`). It writes `run.json` in the output directory,
    where `evaluate` and a resumed training find the run again (`recorded_in`).
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.id = client, run_id
        self.ended = False

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        name: str,
        tags: Mapping[str, str],
        output_dir: Path,
    ) -> TrainingRun:
        """A new run of `experiment` named `name` with `tags` (and MLflow's own: user, source,
        git), MLflow's active run from here on, sampling system metrics."""
        client = fluent_store(tracking_uri)
        active = mlflow.start_run(
            experiment_id=experiment_id(client, experiment),
            run_name=name,
            tags=dict(tags),
            log_system_metrics=True,
        )
        run = cls(client, active.info.run_id)
        run.name = name
        run.point_at(output_dir, tracking_uri)
        return run

    @classmethod
    def resume(
        cls, tracking_uri: str, run_id: str, tags: Mapping[str, str], output_dir: Path
    ) -> TrainingRun:
        """Run `run_id` running again (an interrupted start may have ended it FAILED or
        KILLED), with `tags` added (what the resume changed on purpose); MLflow's active run
        from here on, sampling system metrics."""
        client = fluent_store(tracking_uri)
        active = mlflow.start_run(run_id, log_system_metrics=True)
        run = cls(client, run_id)
        run.name = active.info.run_name
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        run.point_at(output_dir, tracking_uri)
        return run

    def point_at(self, output_dir: Path, tracking_uri: str) -> None:
        """Leave `run.json` in the training's output directory (the store's URI masked)."""
        record = {"run_id": self.id, "tracking_uri": mask_password(tracking_uri)}
        (output_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def of_record(cls, recorded: Mapping[str, str]) -> TrainingRun:
        """The run a `run.json` record names (`read_run`), unchecked."""
        return cls(tracking_client(recorded["tracking_uri"]), recorded["run_id"])

    @classmethod
    def recorded_in(cls, output_dir: Path, timeout_s: float) -> TrainingRun | None:
        """The run of the finished training in `output_dir` (None if it recorded none), for
        `evaluate` to add its reports to: its store answered within `timeout_s` and holds it.
        The training ended it; this adds to it and never ends it."""
        if not (output_dir / RUN_FILE).is_file():
            return None
        recorded = read_run(output_dir)
        check_store(recorded["tracking_uri"], timeout_s)
        run = cls.of_record(recorded)
        try:
            run.client.get_run(run.id)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            raise PipelineError(
                f"{output_dir / RUN_FILE} names MLflow run {run.id}, which the store at "
                f"{mask_password(recorded['tracking_uri'])} does not hold (deleted with its "
                "store?): train again (with DVC: `dvc repro --force train@NAME`)"
            ) from None
        return run

    @classmethod
    def end_abandoned(cls, output_dir: Path) -> None:
        """End FAILED the run that rank 0 left RUNNING in `output_dir` when it died without
        ending it (killed, out of memory): for the process that started that rank (DDP's
        launcher), the one left to say how it ended. A run rank 0 ended stays as it ended."""
        if not (output_dir / RUN_FILE).is_file():
            return
        run = cls.of_record(read_run(output_dir))
        if run.client.get_run(run.id).info.status == "RUNNING":
            run.end("FAILED")

    def record_training(
        self,
        config: Mapping[str, Any],
        summary: str,
        tags: Mapping[str, str],
        datasets: list[DatasetInput],
    ) -> None:
        """What a person looks for in the UI: the resolved config as params and as YAML (store
        password masked), the git commit and the data checksum as tags, the data splits as
        dataset inputs, the architecture summary. Once, in a new run: a resumed run has them."""
        uri = mask_password(config["mlflow"]["tracking_uri"])
        config = {**config, "mlflow": {**config["mlflow"], "tracking_uri": uri}}
        self.client.log_batch(self.id, params=recorded_params(config))
        for key, value in tags.items():
            self.client.set_tag(self.id, key, value)
        self.client.log_text(self.id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        self.client.log_text(self.id, summary, "summary.txt")
        self.client.log_inputs(self.id, datasets)
        experiment = self.client.get_run(self.id).info.experiment_id
        self.client.set_experiment_tag(experiment, *EXPERIMENT_KIND)

    @functools.cached_property
    def name(self) -> str:
        """The run's name (known from the start when this process started or resumed it)."""
        return self.client.get_run(self.id).info.run_name

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        self.client.log_metric(self.id, key, value, step=step)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        model_id: str | None = None,
        dataset: tuple[str, str] | tuple[None, None] = (None, None),
    ) -> None:
        """`metrics` at step 0 in one write; of the logged model `model_id` too, measured on
        `dataset` (name, digest), when given."""
        now = int(time.time() * 1000)  # MLflow's timestamps: milliseconds
        name, digest = dataset
        measured = [
            Metric(key, value, now, 0, model_id=model_id, dataset_name=name, dataset_digest=digest)
            for key, value in metrics.items()
        ]
        self.client.log_batch(self.id, metrics=measured)

    def logged_model_id(self) -> str | None:
        """The id of the MLflow model this run logged (its last, if several); None if none."""
        outputs = self.client.get_run(self.id).outputs
        models = sorted(outputs.model_outputs, key=lambda m: m.step) if outputs else []
        return models[-1].model_id if models else None

    def log_evaluation(self, metrics: Mapping[str, float], dataset: tuple[str, str]) -> None:
        """Evaluation `metrics` of the test split `dataset` (name, digest): the run's, and its
        logged model's when it has one (the model's page lists them and the data they measure)."""
        self.log_metrics(metrics, self.logged_model_id(), dataset)

    def describe(self, text: str) -> None:
        """The run's description, what the UI shows first on its page."""
        self.client.set_tag(self.id, MLFLOW_RUN_NOTE, text)

    def log_artifact(self, path: Path, directory: str) -> None:
        self.client.log_artifact(self.id, str(path), directory)

    def end(self, status: str) -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED), its system metrics with it;
        the first status set is the one it keeps."""
        if self.ended:
            return
        self.ended = True
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.id:
            mlflow.end_run(status)
        else:
            self.client.set_terminated(self.id, status)

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> None:
        self.end(ended_status(error))


def fluent_store(tracking_uri: str) -> MlflowClient:
    """A client of the store, which MLflow's fluent API (the active run, its system metrics,
    `log_model`) uses too."""
    client = tracking_client(tracking_uri)
    mlflow.set_tracking_uri(client.tracking_uri)
    return client


def ended_status(error: BaseException | None) -> str:
    """FINISHED, or FAILED for an `error`; KILLED when its user pressed Ctrl-C: a
    KeyboardInterrupt, or the SystemExit(1) Lightning raises after shutting down for one."""
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"
