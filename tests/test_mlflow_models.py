"""Trained models as MLflow models, and what a run shows in the MLflow UI: a real sqlite store
and Model Registry, pyfunc loading, and a real `mlflow models serve` process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.data.store import load_split, read_meta, split_path
from pipeline.errors import PipelineError
from pipeline.evaluation.logged_model import CHAMPION, model_score, register, run_model_id
from pipeline.tracking.server import wait_healthy
from pipeline.tracking.store import read_run
from pipeline.training.fit import train
from pipeline.training.module import Classifier
from tests.conftest import env, free_port, train_config

pytestmark = pytest.mark.slow  # every test here reads a training's model

# a GAP LeNet-5 trained at sizes from 21 to 42 px (data.augment.scale_range), kept short
GAP_SIZES = (21, 28, 42)
GAP_RUN = (
    "model=lenet5_gap",
    "data.augment.scale_range=[0.75,1.5]",
    "data.batch_size=64",
    "optimizer=adam",
    "optimizer.lr=0.003",
    "trainer.max_epochs=8",
    "evaluation.scales=[0.75,1.0,1.5]",  # GAP_SIZES
)


@pytest.fixture(scope="module")
def gap_run(shared_run, data_dir, tmp_path_factory) -> tuple[str, Path]:
    """(its run id, its output dir): trained into the shared run's store, so that the two
    models can compete in one registry."""
    _, _, uri = shared_run
    cfg = train_config(f"paths.data_dir={data_dir}", f"mlflow.tracking_uri={uri}", *GAP_RUN)
    output_dir = tmp_path_factory.mktemp("gap")
    train(cfg, output_dir)
    return read_run(output_dir)["run_id"], output_dir


@pytest.fixture
def store(shared_run) -> Iterator[MlflowClient]:
    """A client of the shared store, which is also the fluent API's for the test."""
    _, _, uri = shared_run
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)


def shared_run_id(shared_run) -> str:
    return read_run(shared_run[1])["run_id"]


def test_run_shows_its_datasets_system_metrics_and_experiment_kind(shared_run, data_dir, store):
    run = store.get_run(shared_run_id(shared_run))
    meta = read_meta(data_dir / "processed" / "digits")
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}  # the context tag of each
    for split, dataset in inputs.items():
        assert dataset.name == f"digits-{split}"
        assert meta["splits"][split]["sha256"].startswith(dataset.digest)
        assert len(dataset.digest) == 36  # MLflow's longest
        assert json.loads(dataset.source)["uri"] == str(
            split_path(data_dir / "processed/digits", split).resolve()
        )
        assert json.loads(dataset.profile)["num_rows"] == meta["splits"][split]["count"]
    metrics = run.data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        metrics
    )
    experiment = store.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_fc_model_is_logged_with_its_run_checkpoint_metrics_and_fixed_size(shared_run, store):
    metrics, output_dir, _ = shared_run
    run_id = shared_run_id(shared_run)
    model = store.get_logged_model(run_model_id(store, run_id))
    assert model.source_run_id == run_id
    assert model.tags["checkpoint"] == f"runs:/{run_id}/evaluation/best.ckpt"
    assert model.params["model.head"] == "fc"  # the run's config
    assert model_score(store, model.model_id) == pytest.approx(metrics["test/acc"])
    assert {m.key for m in model.metrics} >= {"test/acc", "test/loss", "val/acc_best"}

    pyfunc = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)
    example = pyfunc.metadata.load_input_example(pyfunc.metadata.artifact_path)
    assert example.dtype == np.uint8 and example.shape[1:] == (1, 28, 28)
    checkpoint = Classifier.load_from_checkpoint(
        output_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True
    ).eval()
    batch = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    answer = pyfunc.predict(batch.numpy())
    with torch.no_grad():
        assert answer["class_index"].tolist() == checkpoint(batch).argmax(1).tolist()
    with pytest.raises(MlflowException, match=r"expected shape \(-1, 1, 28, 28\)"):
        pyfunc.predict(np.zeros((2, 1, 42, 42), dtype=np.uint8))

    # its MLmodel names its loader module and its own folders, no path of the machine it left
    flavor = pyfunc.metadata.flavors["python_function"]
    assert (flavor["loader_module"], flavor["data"]) == (
        "pipeline.evaluation.served_model",
        "data/classifier",
    )
    mlmodel = Path(pyfunc.metadata.artifact_path.removeprefix("file://"), "MLmodel").read_text()
    assert "/tmp" not in mlmodel.replace(pyfunc.metadata.artifact_path, "")


def resized(images: torch.Tensor, size: int) -> np.ndarray:
    """uint8 images at `size` x `size`, as a client would send them."""
    scaled = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return scaled.round().clamp(0, 255).to(torch.uint8).numpy()


def test_gap_champion_classifies_images_at_any_size_and_names_the_smallest(
    gap_run, data_dir, store
):
    run_id, _ = gap_run
    register(store, run_id, "digits-gap")
    model = mlflow.pyfunc.load_model(f"models:/digits-gap@{CHAMPION}")
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 1, -1, -1)
    test = load_split(data_dir / "processed" / "digits", "test")
    classes = read_meta(data_dir / "processed" / "digits")["classes"]
    evaluated = store.get_run(run_id).data.metrics
    for size in GAP_SIZES:
        answer = model.predict(resized(test.images, size))
        accuracy = (answer["class_index"].to_numpy() == test.labels.numpy()).mean()
        # the pipeline's own evaluation at that size, on unrounded pixels
        assert accuracy == pytest.approx(evaluated[f"test/acc_{size}px"], abs=0.03), size
        assert accuracy > 0.3, f"{accuracy:.3f} at {size} px: barely above chance (0.1)"
        assert answer["class_name"].tolist() == [classes[i] for i in answer["class_index"]]
        probabilities = np.stack(answer["probabilities"].to_list())
        assert probabilities.shape == (len(test.labels), 10)
        assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="at least 1x12x12"):
        model.predict(np.zeros((1, 1, 8, 8), dtype=np.uint8))


def test_champion_alias_moves_only_to_a_better_model(shared_run, gap_run, store):
    runs = sorted(
        [shared_run_id(shared_run), gap_run[0]],
        key=lambda run_id: model_score(store, run_model_id(store, run_id)),
    )
    worse, better = runs
    assert model_score(store, run_model_id(store, worse)) < model_score(
        store, run_model_id(store, better)
    )
    first, champion = register(store, worse, "rising")
    assert (str(first.version), champion) == ("1", True)
    second, champion = register(store, better, "rising")
    assert (str(second.version), champion) == ("2", True)
    assert str(store.get_model_version_by_alias("rising", CHAMPION).version) == "2"

    register(store, better, "kept")
    second, champion = register(store, worse, "kept")
    assert (str(second.version), champion) == ("2", False)
    again, champion = register(store, worse, "kept")  # the same run: the same version
    assert (str(again.version), champion) == ("2", False)
    assert str(store.get_model_version_by_alias("kept", CHAMPION).version) == "1"
    assert store.get_model_version_by_alias("kept", CHAMPION).run_id == better

    # each version says how good it is; the registered model names its champion's figures
    version = store.get_model_version("kept", "2")
    run = store.get_run(worse)
    assert version.description == run.data.tags["mlflow.note.content"]
    assert "on digits: test accuracy" in version.description
    assert version.tags["test_accuracy"] == f"{run.data.metrics['test/acc']:.4f}"
    assert version.tags["smallest_input_px"] == str(int(run.data.metrics["test/min_input_size"]))
    assert version.tags["test_data"].startswith("digits-test ")
    assert version.tags["run"] == f"{run.info.run_name} ({worse})"
    assert "accuracy_by_size" in version.tags
    kept = store.get_registered_model("kept").description
    assert (
        kept.startswith(f"@{CHAMPION}: version 1. ")
        and store.get_run(better).data.tags["mlflow.note.content"] in kept
    )


def test_evaluate_registers_the_model_of_a_run_in_any_store(gap_run, data_dir, store, tmp_path):
    """The DVC stage's command, run where the default store (./mlruns) is not the run's."""
    run_id, output_dir = gap_run
    command = [sys.executable, "-m", "pipeline.evaluate", f"run_dir={output_dir}"]
    command += [
        f"out_dir={tmp_path / 'eval'}",
        "register=by-evaluate",
        f"paths.data_dir={data_dir}",
    ]
    environment = {k: v for k, v in env().items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run(command, cwd=tmp_path, env=environment, check=True, timeout=600)
    assert store.get_model_version_by_alias("by-evaluate", CHAMPION).run_id == run_id
    # the logged model knows its version (the UI's "Model versions" on the model's page)
    model = store.get_logged_model(run_model_id(store, run_id))
    versions = json.loads(model.tags["mlflow.modelVersions"])
    assert ("by-evaluate", "1") in {(v["name"], str(v["version"])) for v in versions}
    assert not (tmp_path / "mlruns").exists()


def test_evaluate_without_the_data_says_how_to_make_it(gap_run, tmp_path):
    command = [sys.executable, "-m", "pipeline.evaluate", f"run_dir={gap_run[1]}"]
    command.append(f"paths.data_dir={tmp_path}")
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "no test split in" in result.stdout and "pipeline.data.preprocess" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_evaluate_of_a_run_gone_from_its_store_says_to_train_again(gap_run, data_dir, tmp_path):
    """What DVC restores from its cache after the MLflow store was deleted."""
    run_dir = tmp_path / "run"
    shutil.copytree(gap_run[1], run_dir)
    run = {**read_run(run_dir), "tracking_uri": f"sqlite:///{tmp_path / 'new.db'}"}
    (run_dir / "run.json").write_text(json.dumps(run))
    command = [sys.executable, "-m", "pipeline.evaluate", f"run_dir={run_dir}"]
    command.append(f"paths.data_dir={data_dir}")
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert f"names MLflow run {run['run_id']}, which the store at" in result.stdout
    assert "dvc repro --force train@" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture
def served(shared_run, gap_run, store, tmp_path) -> Iterator[str]:
    """`mlflow models serve` of the registered GAP model, as the README shows it: its URL."""
    register(store, gap_run[0], "digits-gap")
    port = free_port()
    tools = Path(sys.executable).parent  # mlflow, and the uvicorn it starts
    command = [
        "mlflow",
        *("models", "serve", "-m", f"models:/digits-gap@{CHAMPION}"),
        *("--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)),
    ]
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={
                **env(),
                "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
                "MLFLOW_TRACKING_URI": shared_run[2],
            },
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, timeout=240, path="/ping")
    except PipelineError as error:
        pytest.fail(f"{error}\n{log.read_text()[-4000:]}")
    yield url
    server.terminate()
    server.wait(timeout=60)


def test_served_model_answers_a_rest_request(served, data_dir, store):
    test = load_split(data_dir / "processed" / "digits", "test")
    images = resized(test.images[:3], 42)  # not the data's 28 px: a GAP model takes any size
    request = urllib.request.Request(
        f"{served}/invocations",
        data=json.dumps({"inputs": images.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    print(json.dumps(answer))  # the README's example answer
    predictions = answer["predictions"]
    expected = mlflow.pyfunc.load_model(f"models:/digits-gap@{CHAMPION}").predict(images)
    assert [p["class_index"] for p in predictions] == expected["class_index"].tolist()
    assert [p["class_name"] for p in predictions] == expected["class_name"].tolist()
    assert np.allclose(
        [p["probabilities"] for p in predictions], expected["probabilities"].to_list()
    )
