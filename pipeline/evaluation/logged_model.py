"""A trained classifier as an MLflow model, and its place in the Model Registry.

The logged model is a pyfunc of its own loader module (`served_model.py`): loading it imports
that module, which rebuilds the network from its config (`build_classifier` on the ModelConfig and
DatasetConfig it was trained with) and a state dict read with `weights_only=True`; the model
carries this package's code, and the user's package that defines its backbone if it has one.
Nothing on the way from a checkpoint to a served model is unpickled beyond tensors. Its
signature takes uint8 images N x C x H x W, any H and W for GAP and SPP heads (MLflow refuses
other sizes for an fc head, naming the one it takes); it answers each image's class index, class
name and probabilities. The model's own code refuses, with an MlflowException (served: a 400
saying why), images below its network's smallest size and pixels all 0 or 1 (floats in [0, 1]
cast to the uint8). The model carries the run's params, its test metrics and links to its run
and checkpoint.

A registered model's `champion` alias points at its version with the best test accuracy: a new
version takes it only by beating it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.types.schema import Array, ColSpec
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

import pipeline
from pipeline.errors import PipelineError
from pipeline.evaluation import served_model
from pipeline.tracking.runs import TrainingRun, by_size

if TYPE_CHECKING:
    from pipeline.training.module import Classifier

log = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE = "test/acc"  # what the champion is chosen by
# what loading the model imports (pinned to this environment's versions, so that MLflow need not
# load the model in a subprocess to infer them)
REQUIREMENTS = ("torch", "hydra-core", "numpy", "pandas")
OUTPUTS = Schema(
    [
        ColSpec("long", "class_index"),
        ColSpec("string", "class_name"),
        ColSpec(Array("double"), "probabilities"),
    ]
)


def signature(module: Classifier) -> ModelSignature:
    """uint8 N x C x H x W in, H and W free (-1) unless the head needs its training size."""
    channels, height, width = module.model.network.expected_input
    if not module.model.network.fixed_size:
        height = width = -1
    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, height, width))])
    return ModelSignature(inputs, OUTPUTS)


def code_paths(model: dict) -> list[str]:
    """The packages loading the model imports: this one, and the top-level package (or module)
    that defines a user's own backbone (`model.backbone._target_`)."""
    paths = [str(Path(pipeline.__file__).parent)]
    if isinstance(model["backbone"], dict):
        spec = importlib.util.find_spec(model["backbone"]["_target_"].partition(".")[0])
        if spec is not None and spec.origin is not None:
            origin = Path(spec.origin)
            paths.append(str(origin.parent if spec.submodule_search_locations else origin))
    return paths


def log_model(
    module: Classifier, example: torch.Tensor, step: int, checkpoint: str, name: str
) -> str:
    """Log `module` (its best weights) as the model `name` (its training's) of MLflow's active
    run, the training's (pipeline.tracking.runs.TrainingRun keeps it active: MLflow logs a model
    into no other); returns the model's id.

    The run's metrics logged at `step` (the test's) become the model's too; `example`: a few
    test images, the input example."""
    # served_model.py's input: ModelConfig and DatasetConfig as dicts, the data's mean and std
    config = {key: module.hparams[key] for key in ("model", "dataset", "mean", "std")}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "classifier")
        data.mkdir()
        (data / served_model.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        torch.save(module.model.network.state_dict(), data / served_model.WEIGHTS)
        info = mlflow.pyfunc.log_model(
            name=name,
            loader_module=served_model.__name__,
            data_path=str(data),
            code_paths=code_paths(config["model"]),
            signature=signature(module),
            input_example=example.cpu().numpy(),
            # mlflow by its module's version: mlflow-skinny installs the same module
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                *(f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS),
            ],
            tags={"checkpoint": checkpoint, "network": module.model.network.name},
            step=step,
        )
    return info.model_id


def run_model_id(client: MlflowClient, run_id: str) -> str:
    """The id of the MLflow model that run `run_id` logged (its last, if several)."""
    model_id = TrainingRun(client, run_id).logged_model_id()
    if model_id is None:
        raise PipelineError(
            f"MLflow run {run_id} logged no model: train with mlflow.log_model=true to register it"
        )
    return model_id


def model_score(client: MlflowClient, model_id: str) -> float:
    """The model's test accuracy (-inf when it has none: any measured model beats it)."""
    metrics = client.get_logged_model(model_id).metrics or []
    return max((m.value for m in metrics if m.key == SCORE), default=-np.inf)


def describe_version(client: MlflowClient, version: ModelVersion, model_id: str) -> None:
    """What a model version's page says: its run's description (the model, its test accuracy,
    its range over input sizes, its smallest input) and those figures as tags, with the test
    data's digest and the run it comes from."""
    run = client.get_run(version.run_id)
    metrics = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    accuracy = by_size({key: metric.value for key, metric in metrics.items()})
    tags = {"run": f"{run.info.run_name} ({run.info.run_id})"}
    if SCORE in metrics:
        tags["test_accuracy"] = f"{metrics[SCORE].value:.4f}"
    if measured := next((m for m in metrics.values() if m.dataset_name), None):
        tags["test_data"] = f"{measured.dataset_name} {measured.dataset_digest}"
    if accuracy:
        low, high = min(accuracy.values()), max(accuracy.values())
        tags["accuracy_by_size"] = f"{low:.4f} to {high:.4f} ({min(accuracy)}-{max(accuracy)} px)"
    if "test/min_input_size" in metrics:
        tags["smallest_input_px"] = str(int(metrics["test/min_input_size"].value))
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    note = run.data.tags.get(MLFLOW_RUN_NOTE, f"from run {run.info.run_name}")
    client.update_model_version(version.name, version.version, description=note)


def register(client: MlflowClient, run_id: str, name: str) -> tuple[ModelVersion, bool]:
    """Register run `run_id`'s model as a version of `name` (once: the same run again finds its
    version) and give it the `champion` alias if it beats the current one's test accuracy;
    returns (the version, whether it is the champion now)."""
    model_id = run_model_id(client, run_id)
    # MLflow looks a version's source (models:/MODEL_ID) up through the process's tracking URI,
    # not the client's (a TODO in its SqlAlchemyStore.create_model_version)
    mlflow.set_tracking_uri(client.tracking_uri)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    # mlflow.register_model also links the logged model to its version (the UI shows it there)
    registered = found[0] if found else mlflow.register_model(f"models:/{model_id}", name)
    describe_version(client, registered, model_id)
    score = model_score(client, model_id)
    current = client.get_registered_model(name).aliases.get(CHAMPION)
    if current is not None and str(current) == str(registered.version):
        return registered, True
    if current is not None:
        champion = client.get_model_version(name, current)
        best = model_score(client, run_model_id(client, champion.run_id))
        if score <= best:
            log.info(
                "%s v%s: %s %.4f, not above @%s v%s's %.4f",
                *(name, registered.version, SCORE, score, CHAMPION, current, best),
            )
            return registered, False
    client.set_registered_model_alias(name, CHAMPION, registered.version)
    champion = client.get_model_version(name, registered.version)
    client.update_registered_model(
        name, description=f"@{CHAMPION}: version {registered.version}. {champion.description}"
    )
    log.info("%s v%s is @%s: %s %.4f", name, registered.version, CHAMPION, SCORE, score)
    return registered, True
