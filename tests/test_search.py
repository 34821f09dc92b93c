"""Optuna searches (`hydra/sweeper=optuna`, pipeline/search/) as real `python -m pipeline.train
-m` processes on the real digits data, their studies in real sqlite files beside real MLflow
stores: pruning, a search resumed after its process is killed mid-trial, two sweep processes
sharing one study, trials packed onto the cores, and bad input refused before any trial."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.search.study import ERROR_ATTR, PARENT_ATTR, RUN_ATTR, open_storage
from pipeline.tracking.sweeps import PARENT_TAG, SCORE
from tests.conftest import cli, env

STUDY = "digits-digits_optuna"  # the default name: experiment and search preset
# the preset's search narrowed to the learning rate; short trials, no model or checkpoint copy
SEARCH = (
    "hparams_search=digits_optuna",
    "model.head=fc",
    "optimizer.momentum=0.9",
    "optimizer.weight_decay=0",
    "data.batch_size=64",
    "evaluation.scales=[1.0]",
    "mlflow.log_checkpoint=false",
    "mlflow.log_model=false",
)
# a good and a hopeless learning rate; the random sampler's seed 0 asks bad, good, bad, bad
GOOD_AND_BAD = ("optimizer.lr=choice(0.05,0.00001)", "hydra/sweeper/sampler=random")
WAIT_S = 600  # a bound for a hang, not for speed


def start(tmp: Path, data_dir: Path, name: str, *overrides: str) -> subprocess.Popen:
    """A search from `tmp`, tracked in `tmp`/mlflow.db (its study: `tmp`/optuna.db), into
    `tmp`/`name`, its output in `tmp`/`name`.log."""
    command = cli(tmp, data_dir, *SEARCH, f"hydra.sweep.dir={tmp / name}", *overrides, "-m")
    with (tmp / f"{name}.log").open("w") as log:
        return subprocess.Popen(
            command, cwd=tmp, env=env(), stdout=log, stderr=log, start_new_session=True
        )


def finish(search: subprocess.Popen, tmp: Path, name: str) -> str:
    """Wait for the search; it must succeed. Returns its output."""
    search.wait(timeout=WAIT_S)
    output = (tmp / f"{name}.log").read_text()
    assert search.returncode == 0, output[-4000:]
    assert "database is locked" not in output and "Traceback" not in output
    return output


def study(tmp: Path) -> optuna.Study:
    """The search's study (its storage opened as the search opens it: taking turns with it
    while a new sqlite file gets its tables)."""
    storage = open_storage(f"sqlite:///{tmp / 'optuna.db'}", heartbeat_s=5)
    return optuna.load_study(study_name=STUDY, storage=storage)


def trials_so_far(tmp: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, none while the search is still creating it."""
    try:
        return study(tmp).get_trials()
    except KeyError:  # no such study yet (also while its new storage has no tables)
        return []


def first_best_trial(searched: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial a search's parent run names: of the completed trials with the best score (the
    searches maximise it), the first asked."""
    complete = searched.get_trials(states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number))


def runs_by_trial(client: MlflowClient) -> dict[int, list]:
    """The trials' MLflow runs, by trial number."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[int, list] = {}
    for run in client.search_runs(experiments):
        if "optuna.trial" in run.data.tags:
            found.setdefault(int(run.data.tags["optuna.trial"]), []).append(run)
    return found


def test_pruning_stops_trailing_trials_early_and_the_parent_run_is_the_study(tmp_path, data_dir):
    # the default pruner: the median of the finished trials, once two have, from the second
    # epoch. Trials 0 and 1 start together; 2 and 3, each in the slot of the first to end, are
    # pruned once both have (epochs enough that this happens first)
    epochs = 6
    search = start(
        tmp_path,
        data_dir,
        "sweep",
        *GOOD_AND_BAD,
        f"trainer.max_epochs={epochs}",
        "hydra.sweeper.n_trials=4",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    finish(search, tmp_path, "sweep")
    searched = study(tmp_path)
    trials = searched.get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = runs_by_trial(client)
    parent_id = searched.user_attrs[PARENT_ATTR]
    for trial in trials:
        (run,) = runs[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ATTR]
        assert run.data.tags[PARENT_TAG] == parent_id
        assert run.data.tags["optuna.state"] == trial.state.name
        curve = client.get_metric_history(run.info.run_id, "val/acc")
        assert len(curve) == len(trial.intermediate_values)  # each epoch reported, once
        # two trials at a time on this machine's cores: each one got its share
        assert run.data.tags["torch.threads"] == str(max(1, (os.cpu_count() or 1) // 2))
        if trial.state == TrialState.PRUNED:  # a hopeless one, stopped before its end
            assert trial.params["optimizer.lr"] == 0.00001
            assert run.info.status == "KILLED" and 2 <= len(curve) < epochs
        else:
            assert run.info.status == "FINISHED" and len(curve) == epochs

    parent = client.get_run(parent_id)
    best = first_best_trial(searched)  # ties: two trials may score the same
    assert parent.info.status == "FINISHED" and PARENT_TAG not in parent.data.tags
    assert parent.data.metrics[SCORE] == pytest.approx(best.value)
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.tags["best_run_id"] == best.user_attrs[RUN_ATTR]
    assert parent.data.tags["best.optimizer.lr"] == str(best.params["optimizer.lr"])
    assert parent.data.tags["sweep.trials_pruned"] == "2"
    assert parent.data.tags["optuna.study"] == STUDY
    assert parent.data.tags["optuna.sampler"] == "RandomSampler"
    assert parent.data.tags["optuna.pruner"] == "MedianPruner"
    drawn = {a.path for a in client.list_artifacts(parent_id, "study")}
    expected = ("trials.csv", "optimization_history.png", "intermediate_values.png")
    assert {f"study/{name}" for name in expected} <= drawn


def test_a_search_killed_mid_trial_resumes_its_study_and_parent_run(tmp_path, data_dir):
    overrides = (
        "trainer.max_epochs=8",
        "hydra.sweeper.n_trials=3",
        "optimizer.lr=interval(0.01,0.05)",
    )
    first = start(tmp_path, data_dir, "first", *overrides)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:  # until the second trial has reported an epoch
        trials = trials_so_far(tmp_path)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if any(t.state == TrialState.COMPLETE for t in trials) and running:
            break
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep process and its trial, mid-epoch
    first.wait()
    (killed,) = running
    done_before = {t.number for t in trials if t.state == TrialState.COMPLETE}

    finish(start(tmp_path, data_dir, "again", *overrides), tmp_path, "again")
    trials = study(tmp_path).get_trials()
    ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(ended) == 3  # exactly n_trials, over both runs of the command
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed.number]
    assert ERROR_ATTR not in failed[0].user_attrs  # its process died: it did not fail itself
    (retried,) = [t for t in ended if t.system_attrs.get("failed_trial") == killed.number]
    assert retried.params == killed.params  # asked again, as it was
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = runs_by_trial(client)
    assert all(len(runs[number]) == 1 for number in done_before)  # none trained twice
    assert runs[killed.number][0].info.status == "KILLED"
    parents = {r.data.tags[PARENT_TAG] for found in runs.values() for r in found}
    assert parents == {study(tmp_path).user_attrs[PARENT_ATTR]}  # one parent, resumed
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.trials"] == "3"


def test_two_sweep_processes_share_one_study_and_its_budget(tmp_path, data_dir):
    n_trials = 4
    overrides = ("trainer.max_epochs=1", f"hydra.sweeper.n_trials={n_trials}", *GOOD_AND_BAD)
    names = ("one", "two")
    searches = [start(tmp_path, data_dir, name, *overrides) for name in names]
    outputs = [finish(search, tmp_path, name) for search, name in zip(searches, names, strict=True)]
    trials = study(tmp_path).get_trials()
    ran = [t for t in trials if t.state != TrialState.FAIL]  # a surplus one is told failed
    assert len(ran) == n_trials and all(t.state == TrialState.COMPLETE for t in ran)
    runs = runs_by_trial(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert sorted(runs) == sorted(t.number for t in ran)  # every trial ran once, no number twice
    assert all(len(found) == 1 for found in runs.values())
    # each trial run by one process or the other, never both; both ended on the whole study
    ran_by = [set(map(int, re.findall(r"trial (\d+): COMPLETE", output))) for output in outputs]
    assert not ran_by[0] & ran_by[1] and ran_by[0] | ran_by[1] == set(runs)
    assert all("sweep best" in output for output in outputs)
    assert len({r[0].data.tags[PARENT_TAG] for r in runs.values()}) == 1


@pytest.mark.parametrize(
    ("sampler", "space"),
    [
        ("grid", "optimizer.lr=choice(0.05,0.01)"),
        ("cmaes", "optimizer.lr=tag(log,interval(0.005,0.1))"),
        ("gp", "optimizer.lr=tag(log,interval(0.005,0.1))"),
    ],
)
def test_each_sampler_runs_a_search(sampler, space, tmp_path, data_dir):
    overrides = ("trainer.max_epochs=1", "hydra.sweeper.n_trials=2", space)
    finish(start(tmp_path, data_dir, "sweep", f"hydra/sweeper/sampler={sampler}", *overrides),
           tmp_path, "sweep")  # fmt: skip
    searched = study(tmp_path)
    assert [t.state.name for t in searched.trials] == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(searched.user_attrs[PARENT_ATTR])
    named = {"grid": "GridSampler", "cmaes": "CmaEsSampler", "gp": "GPSampler"}[sampler]
    assert parent.data.tags["optuna.sampler"] == named
    lrs = [t.params["optimizer.lr"] for t in searched.trials]
    if sampler == "grid":  # every point of the grid, once
        assert sorted(lrs) == [0.01, 0.05]
    else:
        assert all(0.005 <= lr <= 0.1 for lr in lrs)


BAD_INPUT = [
    ("hydra/sweeper/sampler=tpee", "Available options in 'hydra/sweeper/sampler'"),
    ("hydra/sweeper/pruner=medain", "Available options in 'hydra/sweeper/pruner'"),
    ("optimizer.lr=interval(0.5,0.1)", "optimizer.lr: interval(0.5, 0.1) is not an interval"),
    ("optimizer.lr=tag(log,choice(1,2))", "tag(log, ...) takes an interval(low, high)"),
    ("optimizer.lr=interval(0.1)", "Error parsing override 'optimizer.lr=interval(0.1)'"),
    ("model.heda=choice(fc,gap)", "search space: Could not override 'model.heda'"),
    ("data.batch_size=choice(a,b)", "'a' of type 'str' could not be converted to Integer"),
    ("hydra.sweeper.direction=maximise", "'hydra.sweeper.direction' = 'maximise' is invalid"),
    (
        "hydra.sweeper.storage=postgresql://alice:s3cret@127.0.0.1:1/studies",
        "hydra.sweeper.storage=postgresql://alice:***@127.0.0.1:1/studies cannot be opened",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_search_input_is_one_clear_line_before_any_trial(override, message, tmp_path):
    command = cli(tmp_path, tmp_path / "no-data", *SEARCH, override, "-m")
    result = subprocess.run(
        command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1 and message in output, output[-3000:]
    assert "Traceback" not in output and "s3cret" not in output
    assert not (tmp_path / "multirun").exists()  # no trial started


def test_a_search_on_a_tracking_server_without_a_study_storage_says_what_to_set(tmp_path):
    command = cli(tmp_path, tmp_path / "no-data", *SEARCH, "-m")
    command = [part for part in command if not part.startswith("mlflow.tracking_uri=")]
    environment = {k: v for k, v in env().items() if k != "OPTUNA_STORAGE"}
    environment["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:1"
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "export OPTUNA_STORAGE=" in output, output[-3000:]
