"""Hydra sweeps as real `python -m pipeline.train -m ...` processes on the real digits data:
parallel trials (joblib), an Optuna search with a diverging trial, trials that each train with
2-process CPU DDP, all grouped in one real sqlite MLflow store as a parent run per sweep
(the Optuna search's own abilities: tests/test_search.py)."""

from __future__ import annotations

import getpass
import json
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.tracking.store import read_run
from pipeline.tracking.sweeps import PARENT_TAG, SCORE, SWEEP_FILE, TRIALS_FILE
from tests.conftest import cli, env
from tests.test_search import first_best_trial

pytestmark = pytest.mark.slow  # every test here runs a sweep

# one short epoch, the evaluation at the training size only, no checkpoint copied to MLflow
QUICK = ("trainer.max_epochs=1", "evaluation.scales=[1.0]", "mlflow.log_checkpoint=false")


def sweep(tmp: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run a sweep into `tmp`/sweep, tracked in `tmp`/mlflow.db, from `tmp` as working dir."""
    command = cli(tmp, data_dir, f"hydra.sweep.dir={tmp / 'sweep'}", *QUICK, *overrides, "-m")
    result = subprocess.run(
        command, cwd=tmp, env=env(), capture_output=True, text=True, timeout=400
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "database is locked" not in output
    return result


def sweep_runs(tmp: Path, others: int = 0) -> tuple[MlflowClient, Run, list[Run]]:
    """(client, parent run, child runs) of the sweep in `tmp`/sweep, which shares the store
    with `others` runs."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = client.get_run(json.loads((tmp / "sweep" / SWEEP_FILE).read_text())["run_id"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    every = client.search_runs(experiments)
    children = [r for r in every if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(every) == len(children) + 1 + others  # no run lost, none extra
    return client, parent, children


def trials(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / TRIALS_FILE).read_text().splitlines()]


def job_dirs(tmp: Path) -> list[Path]:
    return sorted(p for p in (tmp / "sweep").iterdir() if p.is_dir())


def assert_parent_records_the_best(client: MlflowClient, parent: Run, children: list[Run]):
    finished = [r for r in children if r.info.status == "FINISHED"]
    best = max(finished, key=lambda r: r.data.metrics[SCORE])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[SCORE] == pytest.approx(best.data.metrics[SCORE])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.info.experiment_id == best.info.experiment_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert TRIALS_FILE in artifacts
    return best


def test_parallel_joblib_trials_are_child_runs_of_one_sweep_run(tmp_path, data_dir):
    # another sweep, started at the same moment, races to create the same new store; its one
    # trial finds no data, so it costs no training
    rival = subprocess.Popen(
        cli(tmp_path, tmp_path / "no-data", "-m"),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    result = sweep(
        tmp_path,
        data_dir,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model.head=fc,gap",
        "optimizer.lr=0.01,0.001",
    )
    rival_output = rival.communicate(timeout=300)[0]
    assert rival.returncode == 1 and "no preprocessed data" in rival_output, rival_output[-3000:]
    client, parent, children = sweep_runs(tmp_path, others=1)
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    (rival_dir,) = (tmp_path / "multirun").glob("*/*")  # the default multirun/DATE/TIME
    rival_parent = client.get_run(json.loads((rival_dir / SWEEP_FILE).read_text())["run_id"])
    assert rival_parent.info.status == "FAILED"  # its only trial failed: so did the sweep
    assert [t["status"] for t in trials(rival_dir)] == ["FAILED"]
    assert rival_parent.info.experiment_id == parent.info.experiment_id
    grid = {(r.data.params["model.head"], r.data.params["optimizer.lr"]) for r in children}
    assert grid == {("fc", "0.01"), ("fc", "0.001"), ("gap", "0.01"), ("gap", "0.001")}
    for run in children:
        assert {"train/loss_epoch", "val/acc", "test/acc", SCORE} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 1
    # two worker processes ran the trials, each in its own directory
    assert "Joblib.Parallel(n_jobs=2" in result.stdout
    dirs = job_dirs(tmp_path)
    assert [d.name for d in dirs] == ["0", "1", "2", "3"]
    assert {read_run(d)["run_id"] for d in dirs} == {r.info.run_id for r in children}
    # each trial named by its sweep and number, its overrides in a tag
    names = {r.data.tags["sweep.job_num"]: r.info.run_name for r in children}
    assert names == {n: f"{parent.info.run_name}-{n}" for n in ("0", "1", "2", "3")}
    assert all("model.head=" in r.data.tags["sweep.overrides"] for r in children)
    [best_run] = [r for r in children if r.info.run_id == parent.data.tags["best_run_id"]]
    link = f"[{best_run.info.run_name}](#/experiments/{best_run.info.experiment_id}/runs/"
    assert parent.data.tags["mlflow.note.content"].startswith(f"4 trials, 0 failed; best: {link}")

    best = assert_parent_records_the_best(client, parent, children)
    assert parent.data.params == {
        "best.model.head": best.data.params["model.head"],
        "best.optimizer.lr": best.data.params["optimizer.lr"],
    }
    assert parent.data.tags["sweep.launcher"] == "JoblibLauncher"
    # the UI's Created by and Source, as MLflow sets them on every run it starts
    assert parent.data.tags["mlflow.user"] == getpass.getuser()
    assert parent.data.tags["mlflow.source.name"].endswith("pipeline/train.py")
    assert "multirun.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert (
        parent.data.tags["sweep.trials"] == "4" and parent.data.tags["sweep.trials_failed"] == "0"
    )


def test_optuna_search_records_a_diverged_trial_as_failed_and_goes_on(tmp_path, data_dir):
    # weight decay 1e5 makes the weights, and then the loss, overflow within the first epoch
    result = sweep(
        tmp_path,
        data_dir,
        "hparams_search=digits_optuna",
        "hydra.sweeper.n_trials=3",
        "optimizer.weight_decay=choice(0,100000)",
        "optimizer.lr=0.05",
        "data.batch_size=64",
    )
    assert "training diverged" in result.stdout + result.stderr
    client, parent, children = sweep_runs(tmp_path)
    log = trials(tmp_path / "sweep")
    assert len(log) == 3 and len(children) == 3
    failed = [t for t in log if t["status"] == "FAILED"]
    assert 1 <= len(failed) < 3, "the sampler seed should give some diverging trials, not all"
    assert all("training diverged" in t["error"] and t["score"] is None for t in failed)
    for run in children:  # a diverged trial's run is FAILED, the others FINISHED
        diverged = run.data.params["optimizer.weight_decay"] == "100000.0"
        assert run.info.status == ("FAILED" if diverged else "FINISHED")
        assert run.data.tags["optuna.state"] == ("FAIL" if diverged else "COMPLETE")
        assert run.info.run_id in {t["run_id"] for t in (failed if diverged else log)}

    # the parent run is the study's: its best trial (of tied ones, as two trials both with
    # weight decay 0 are, the first asked), everywhere
    study = optuna.load_study(
        study_name="digits-digits_optuna", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    assert [t.state.name for t in study.trials].count("FAIL") == len(failed)
    best = first_best_trial(study)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[SCORE] == pytest.approx(best.value)
    assert parent.data.tags["best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert client.get_run(best.user_attrs["mlflow_run_id"]).data.metrics[SCORE] == best.value
    chosen = {k: v for k, v in parent.data.tags.items() if k.startswith("best.")}
    searched = {f"best.{key}": str(value) for key, value in best.params.items()}
    assert chosen == searched | {"best.trial": str(best.number)}  # not the fixed settings
    assert parent.data.tags["best.optimizer.weight_decay"] == "0"
    assert parent.data.tags["sweep.sweeper"] == "OptunaSweeper"
    assert parent.data.tags["sweep.trials_failed"] == str(len(failed))
    assert TRIALS_FILE in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_sweep_of_ddp_trials_gives_each_trial_one_dir_and_one_run(tmp_path, data_dir):
    sweep(
        tmp_path,
        data_dir,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=64",
        "model.head=fc,gap",
    )
    client, parent, children = sweep_runs(tmp_path)
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.params["trainer.devices"] for r in children} == {"2"}
    # rank 1 joined its trial in the trial's directory: no other directory anywhere but the
    # store's artifacts (digits/, beside its database)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["digits", "sweep"]
    dirs = job_dirs(tmp_path)
    assert [d.name for d in dirs] == ["0", "1"]
    assert {read_run(d)["run_id"] for d in dirs} == {r.info.run_id for r in children}
    for job in dirs:
        assert (job / "checkpoints" / "best.ckpt").is_file()
        assert list(job.glob("logs/*/attempt_0/1/stderr.log"))  # rank 1's output, kept here
        # 1,137 training images over 2 ranks: 569 per rank, 9 batches of 64
        last = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 9
    assert_parent_records_the_best(client, parent, children)
