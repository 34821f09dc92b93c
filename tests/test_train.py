"""Training with Lightning, recorded in a real sqlite MLflow store, on the real digits data."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import ModelConfig
from pipeline.models import BACKBONES, HEADS, InputShapeError
from pipeline.tracking.runs import by_size
from pipeline.tracking.store import read_run
from pipeline.training.module import Classifier
from tests.conftest import MNIST, SHARED_RUN, cli, env, free_port, run_module, run_training

pytestmark = pytest.mark.slow  # every test here trains

FAST = ("trainer.max_epochs=2", "data.batch_size=64", "optimizer=adam")


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_run_records_params_metrics_tags_and_artifacts(shared_run):
    metrics, output_dir, uri = shared_run
    client = MlflowClient(uri)
    run = client.get_run(read_run(output_dir)["run_id"])
    assert run.info.run_name.startswith("digits-lenet5_fc-")  # no name given: the default
    logged_models = client.search_logged_models([run.info.experiment_id])  # other runs' too
    [model] = [m for m in logged_models if m.source_run_id == run.info.run_id]
    assert model.name == run.info.run_name
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    # beside the store's database, not in ./mlruns of the process that created the experiment
    store_dir = Path(uri.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith(f"{store_dir.as_uri()}/digits/")
    params = run.data.params
    assert params["model.backbone"] == "lenet5" and params["optimizer.name"] == "adam"
    assert params["dataset.val_size"] == "300" and params["seed"] == "0"
    assert len(run.data.tags["git_commit"]) >= 40
    meta = json.loads((Path(params["paths.data_dir"]) / "processed/digits/meta.json").read_text())
    assert run.data.tags["data_sha256"] == meta["sha256"]
    logged = run.data.metrics
    for name in ("train/loss_step", "train/loss_epoch", "train/acc", "val/acc", "val/loss"):
        assert name in logged
    assert [f"test/acc_class/{i}" in logged for i in range(10)] == [True] * 10
    assert logged["test/acc"] == pytest.approx(metrics["test/acc"])
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 5  # one per epoch
    assert list(by_size(logged)) == [14, 21, 28, 35, 42, 56, 70, 84]
    # where its time went, phase by phase
    phases = ("fit", "test", "model", "evaluation")
    assert all(logged[f"time/{phase}_s"] > 0 for phase in phases)
    # what the run's page says first, with the accuracy at its training size
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"lenet5-fc on digits: test accuracy {logged['test/acc']:.2%}")
    assert "smallest input 28 px" in note
    # its params: the values set, and not the store's address
    assert "None" not in params.values() and "mlflow.tracking_uri" not in params
    # the logged model holds every evaluation metric, of the test split it measured
    measured = {m.key: m for m in model.metrics}
    assert {"test/acc", "test/acc_28px", "test/min_input_size"} <= set(measured)
    assert measured["test/acc_28px"].dataset_name == "digits-test"
    assert measured["test/acc_28px"].dataset_digest == meta["splits"]["test"]["sha256"][:36]
    assert {
        "config.yaml",
        "summary.txt",
        *(f"evaluation/{name}" for name in ("metrics.json", "predictions.csv", "resolution.csv")),
        *(f"evaluation/{name}.png" for name in ("confusion", "misclassified", "kernels")),
        "evaluation/resolution.png",
        "evaluation/best.ckpt",
    } <= artifact_paths(client, run.info.run_id)
    summary = client.download_artifacts(run.info.run_id, "summary.txt", str(output_dir / "dl"))
    assert "61,706" in Path(summary).read_text()


def test_same_config_and_seed_give_the_same_metrics(shared_run, tmp_path, data_dir):
    again, _, _ = run_training(tmp_path, data_dir, *SHARED_RUN)
    assert again == shared_run[0]


def test_compiled_training_reaches_the_eager_accuracy(shared_run, tmp_path, data_dir):
    eager = shared_run[0]
    compiled, output_dir, _ = run_training(
        tmp_path, data_dir, *SHARED_RUN, "trainer.compile=true", "train.evaluate=false"
    )
    # the same steps in other kernels: equal up to rounding, so within noise after 5 epochs
    assert compiled["val/acc_best"] == pytest.approx(eager["val/acc_best"], abs=0.02)
    assert compiled["test/acc"] == pytest.approx(eager["test/acc"], abs=0.02)
    # the checkpoint holds the eager model's keys: evaluate restores it without compiling
    weights = torch.load(output_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert all(key.startswith("model.network.") for key in weights["state_dict"])


def test_evaluate_reloads_the_checkpoint_weights_only(shared_run, data_dir):
    metrics, output_dir, _ = shared_run
    out = output_dir / "re-eval"
    result = run_module(
        "pipeline.evaluate",
        f"run_dir={output_dir}",
        f"out_dir={out}",
        f"paths.data_dir={data_dir}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["test_acc"] == pytest.approx(metrics["test/acc"])
    sizes = {"14", "21", "28", "35", "42", "56", "70", "84"}  # evaluation.scales x 28 px
    assert set(evaluated["test_acc_at_size"]) == sizes
    assert (out / "predictions.csv").read_text().count("\n") == 361  # header + 360 test images


def test_fc_model_at_another_resolution_says_which_it_expects(shared_run):
    _, output_dir, _ = shared_run
    module = Classifier.load_from_checkpoint(
        output_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True
    )
    with pytest.raises(InputShapeError, match="expects 1x28x28"):
        module(torch.zeros(2, 1, 24, 24))


def test_last_checkpoint_keeps_both_checkpoint_callbacks_states_apart(shared_run):
    metrics, output_dir, _ = shared_run
    saved = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    states = {key: state for key, state in saved.items() if "Checkpoint" in key}
    assert len(states) == 2  # best and last, each under its own key, as resuming needs
    best = next(state for key, state in states.items() if "val/acc" in key)
    assert best["best_model_score"].item() == pytest.approx(metrics["val/acc_best"])


def test_early_stopping_watches_val_acc_and_its_state_goes_into_the_checkpoint(tmp_path, data_dir):
    overrides = (*FAST, "trainer.early_stopping_patience=1", "train.evaluate=false")
    metrics, output_dir, _ = run_training(tmp_path, data_dir, *overrides)
    saved = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    [state] = [state for key, state in saved.items() if "EarlyStopping" in key]
    assert state["patience"] == 1
    assert state["best_score"].item() == pytest.approx(metrics["val/acc_best"])


GRID = [(backbone, head) for backbone in BACKBONES for head in HEADS]


def scales(backbone: str) -> bool:
    """Whether the backbone has a width multiplier (model.width): the wide ones train narrow."""
    return "width" in BACKBONES[backbone].defaults(ModelConfig(backbone=backbone), MNIST)


@pytest.mark.parametrize(("backbone", "head"), GRID)
def test_every_backbone_and_head_trains(backbone: str, head: str, tmp_path, data_dir):
    extra = ["model.output=linear"] if backbone == "lenet5_classic" else []
    extra += ["model.width=0.125"] if scales(backbone) else []
    extra += ["train.evaluate=false", "mlflow.log_checkpoint=false"]  # the training alone
    metrics, output_dir, uri = run_training(
        tmp_path, data_dir, f"model={backbone}", f"model.head={head}", *FAST, *extra
    )
    client = MlflowClient(uri)
    run_id = read_run(output_dir)["run_id"]
    losses = [m.value for m in client.get_metric_history(run_id, "train/loss_epoch")]
    assert len(losses) == 2 and losses[1] < losses[0]  # it learns
    assert 0 <= metrics["test/acc"] <= 1 and "test/acc" in client.get_run(run_id).data.metrics


def test_lenet5_learns_real_digits_to_95_percent(tmp_path, data_dir):
    # experiment=digits got 349-358 of the 360 test images right over seeds 0-11 (mean 98.5%):
    # 95% (342) is 7 images under the worst seed, so neither the seed nor one image flips it
    metrics, _, _ = run_training(tmp_path, data_dir, "experiment=digits")
    assert metrics["test/acc"] >= 0.95


class ShownProgress(L.Callback):
    """What the progress bar shows at the end of each training epoch: (batches done, total)."""

    def __init__(self) -> None:
        self.shown: list[tuple[float, float | None]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = trainer.progress_bar_callback
        task = bar.progress.tasks[bar.train_progress_bar_id]
        self.shown.append((task.completed, task.total))


def test_progress_bar_skips_steps_between_redraws_but_ends_each_epoch_complete(tmp_path, data_dir):
    probe = ShownProgress()
    run_training(tmp_path, data_dir, *FAST, extra_callbacks=[probe])
    assert probe.shown == [(18, 18), (18, 18)]  # digits: 1,137 training images, batches of 64


def test_profiler_option_reports_lightnings_hook_timings(tmp_path, data_dir, capfd, caplog):
    caplog.set_level(logging.INFO)
    run_training(tmp_path, data_dir, *FAST, "trainer.profiler=simple", "train.evaluate=false")
    # Lightning's logger writes to stderr, or through the root logger when it has handlers
    report = capfd.readouterr().err + caplog.text
    assert "FIT Profiler Report" in report
    assert "[Strategy]SingleDeviceStrategy.training_step" in report  # timed, 36 calls


def test_ddp_on_two_cpu_processes_makes_one_run_and_one_output_dir(tmp_path, data_dir):
    command = cli(
        tmp_path,
        data_dir,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "data.batch_size=64",
    )
    result = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("run.json")]
    all_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1 and all_dirs == run_dirs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.params["trainer.devices"] == "2"
    assert runs[0].info.run_id == read_run(run_dirs[0])["run_id"]
    # 1,137 training images over 2 ranks: shards of 569 and 568, 9 batches of 64 each, 2 epochs
    last = torch.load(run_dirs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 18


def test_a_ddp_rank_0_killed_mid_training_leaves_its_run_failed(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    overrides = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    command = cli(
        tmp_path, data_dir, *overrides, "trainer.max_epochs=100", f"hydra.run.dir={run_dir}"
    )
    launcher = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.2)
    # the ranks: forks of the launcher, started in local-rank order
    launched = psutil.Process(launcher.pid)
    ranks = [p for p in launched.children() if p.cmdline() == launched.cmdline()]
    rank_0 = min(ranks, key=lambda p: p.pid)
    rank_0.kill()  # no cleanup at all: the run's owner is gone
    output, _ = launcher.communicate(timeout=240)
    assert launcher.returncode == 1 and "DDP rank 0 failed" in output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(read_run(run_dir)["run_id"]).info.status == "FAILED"


def test_killed_training_resumes_in_the_same_run_and_matches_an_uninterrupted_one(
    shared_run, tmp_path, data_dir
):
    overrides = SHARED_RUN  # the shared run is the uninterrupted one
    run_dir = tmp_path / "interrupted"
    first = subprocess.Popen(
        cli(tmp_path, data_dir, *overrides, f"hydra.run.dir={run_dir}"),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # the harshest interruption: no cleanup at all
    first.wait()
    interrupted_at = torch.load(last, weights_only=True)["epoch"]
    assert interrupted_at < 4, "the training finished before it could be interrupted"
    run_id = read_run(run_dir)["run_id"]

    resumed = subprocess.run(
        cli(tmp_path, data_dir, *overrides, f"train.resume={run_dir}"),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert read_run(run_dir)["run_id"] == run_id
    assert torch.load(last, weights_only=True)["global_step"] == 5 * 18
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1

    _, straight_dir, straight_uri = shared_run
    resumed_curve = val_curve(client, run_id)
    assert sorted(resumed_curve) == [18 * epoch - 1 for epoch in range(1, 6)]  # every epoch
    straight = val_curve(MlflowClient(straight_uri), read_run(straight_dir)["run_id"])
    assert resumed_curve == straight


def val_curve(client: MlflowClient, run_id: str) -> dict[int, float]:
    """Global step -> val/acc; a step logged twice (before and after a kill): the later value."""
    history = sorted(client.get_metric_history(run_id, "val/acc"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


# DDP over two nodes, a rank on each (the README's SLURM command too)
TWO_NODES = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=1")


def test_two_nodes_started_by_hand_train_one_model_as_one_run(tmp_path, data_dir):
    port = free_port()  # node 0's rendezvous port
    nodes = [
        subprocess.Popen(
            cli(
                tmp_path,
                data_dir,
                *TWO_NODES,
                "trainer.max_epochs=2",
                "data.batch_size=64",
                f"hydra.run.dir={tmp_path / f'node{rank}'}",
            ),
            cwd=tmp_path,
            env={
                **env(),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "NODE_RANK": str(rank),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == read_run(tmp_path / "node0")["run_id"]
    assert run.data.params["trainer.num_nodes"] == "2"
    assert not (tmp_path / "node1" / "run.json").exists()  # node 1's rank never talks to MLflow
    # one process group over both nodes: 1,137 images, shards of 569, 9 batches of 64 an epoch
    last = torch.load(tmp_path / "node0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 18


@pytest.mark.parametrize(
    ("node_rank", "node_0"),
    [
        pytest.param(1, "node0.invalid", id="node-0-never-answers"),
        pytest.param(0, "127.0.0.1", id="node-1-never-starts"),
    ],
)
def test_a_node_whose_peer_is_missing_fails_in_bounded_time_saying_where(
    node_rank, node_0, tmp_path, data_dir
):
    command = cli(
        tmp_path, data_dir, *TWO_NODES, "trainer.ddp_timeout_s=10", f"hydra.run.dir={tmp_path}/node"
    )
    port = free_port()  # node 0's rendezvous port
    where = {"MASTER_ADDR": node_0, "MASTER_PORT": str(port), "NODE_RANK": str(node_rank)}
    result = subprocess.run(
        command, cwd=tmp_path, env={**env(), **where}, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    (said,) = [line for line in output.splitlines() if "could not reach each other" in line]
    assert f"at {node_0}:{port}" in said and "trainer.ddp_timeout_s=10 s" in said
