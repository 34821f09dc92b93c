"""The DVC pipeline in a fresh copy of the repository: the offline digits profile end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.data.store import read_meta
from tests.conftest import REPO, train_config

# every test here runs DVC stages, in one repository copy
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc")]

OFFLINE = ("--glob", "evaluate@digits-*")
# two of the profile's runs (an fc and a gap head): every stage kind, half the processes
DIGITS_RUNS = ("digits-lenet5", "digits-lenet5_gap")


def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def keep_runs(repo: Path, epochs: int) -> None:
    """params.yaml with only DIGITS_RUNS (and every other dataset's), each `epochs` long (the
    last of Hydra's overrides of a key wins)."""
    params = OmegaConf.load(repo / "params.yaml")
    for name in list(params.runs):
        if name.startswith("digits-") and name not in DIGITS_RUNS:
            del params.runs[name]
    for name in DIGITS_RUNS:
        overrides = f"{params.runs[name].overrides} trainer.max_epochs={epochs}"
        params.runs[name].overrides = overrides.strip()  # a double space breaks dvc.lock
    OmegaConf.save(params, repo / "params.yaml")


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree's files that git would commit, as a new git repository, with the
    digits runs cut to two of 2 epochs so the whole profile runs in a few minutes."""
    listed = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO)
    copy = tmp_path_factory.mktemp("repo")
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file() and name != "dvc.lock":
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    keep_runs(copy, epochs=2)
    sh("git", "init", "-q", cwd=copy)
    commit_all(copy, "copy")
    return copy


def test_offline_profile_end_to_end_then_nothing_to_do(repo_copy: Path):
    first = sh("dvc", "repro", *OFFLINE, cwd=repo_copy)
    expected = {"fetch@digits", "preprocess@digits"}
    expected |= {f"{stage}@{run}" for stage in ("train", "evaluate") for run in DIGITS_RUNS}
    assert ran(first.stdout) == expected
    meta = read_meta(repo_copy / "data" / "processed" / "digits")
    assert [meta["splits"][s]["count"] for s in ("train", "val", "test")] == [1137, 300, 360]

    second = sh("dvc", "repro", *OFFLINE, cwd=repo_copy)
    assert ran(second.stdout) == set()
    assert "Data and pipelines are up to date." in second.stdout

    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo_copy).stdout)
    metrics = next(iter(shown.values()))["data"]
    for run in DIGITS_RUNS:
        row = metrics[f"reports/{run}/metrics.json"]["data"]
        assert 0 <= row["test_acc"] <= 1
        assert set(row["test_acc_at_size"]) == {"14", "21", "28", "35", "42", "56", "70", "84"}
    plots = sh("dvc", "plots", "show", "--json", cwd=repo_copy).stdout
    for name in ("history.csv", "predictions.csv", "resolution.csv", "confusion.png"):
        assert name in plots
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert len(runs) == len(DIGITS_RUNS)
    for run in runs:  # evaluated once, by the evaluate stage, into the training's run
        logged = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/best.ckpt", "evaluation/metrics.json"} <= logged
        history = client.get_metric_history(run.info.run_id, "test/acc_at_size")
        assert sorted(m.step for m in history) == [14, 21, 28, 35, 42, 56, 70, 84]
    assert not any((repo_copy / "runs" / run / "eval").exists() for run in DIGITS_RUNS)
    for run in DIGITS_RUNS:  # each registered by its evaluate stage, under its own name
        champion = client.get_model_version_by_alias(run, "champion")
        tags = client.get_run(champion.run_id).data.tags
        assert tags["output_dir"] == str((repo_copy / "runs" / run).resolve())

    # deleted outputs: the trainings come back from DVC's run cache, each run.json with its
    # weights; the reports (cache: false, git's to keep) are made again, into the same runs
    for directory in ("runs", "reports"):
        shutil.rmtree(repo_copy / directory)
    restored = sh("dvc", "repro", *OFFLINE, cwd=repo_copy)
    assert ran(restored.stdout) == {f"evaluate@{run}" for run in DIGITS_RUNS}
    assert len(client.search_runs([runs[0].info.experiment_id])) == len(DIGITS_RUNS)
    for run in DIGITS_RUNS:
        assert (repo_copy / "reports" / run / "metrics.json").is_file()


def test_each_override_of_a_run_changes_its_recipe():
    """params.yaml states only what a run changes in its dataset's recipe, and the recipe
    trains the dataset DVC gives the run."""
    runs = OmegaConf.load(REPO / "params.yaml").runs
    for name, run in runs.items():
        command = [f"experiment={run.dataset}", f"model={run.model}"]
        overrides = run.overrides.split()
        config = train_config(*command, *overrides)
        assert config.dataset.name == run.dataset, name
        for override in overrides:
            rest = [other for other in overrides if other != override]
            assert train_config(*command, *rest) != config, f"{name}: {override} is the recipe's"


def commit_all(repo: Path, message: str) -> None:
    """Commit what changed; empty when a test before on the same copy committed it already."""
    sh("git", "add", "-A", cwd=repo)
    author = ("-c", "user.name=t", "-c", "user.email=t@t")
    sh("git", *author, "commit", "--allow-empty", "-qm", message, cwd=repo)


def test_pushed_results_pull_into_a_fresh_clone_with_nothing_to_rerun(repo_copy: Path):
    sh("dvc", "repro", *OFFLINE, cwd=repo_copy)  # up to date whatever ran before
    commit_all(repo_copy, "results")
    sh("dvc", "push", cwd=repo_copy)  # to the default remote, a directory beside the repo
    assert (repo_copy.parent / "convnet-pipeline-dvc-store" / "files" / "md5").is_dir()

    clone = repo_copy.parent / "clone"
    sh("git", "clone", "-q", str(repo_copy), str(clone), cwd=repo_copy.parent)
    sh("dvc", "pull", "--with-deps", *(f"evaluate@{run}" for run in DIGITS_RUNS), cwd=clone)
    again = sh("dvc", "repro", *OFFLINE, cwd=clone)
    assert ran(again.stdout) == set()
    assert "Data and pipelines are up to date." in again.stdout
    shown = [
        next(iter(json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout).values()))
        for repo in (repo_copy, clone)
    ]
    assert shown[0] == shown[1] and shown[0]["data"]
    assert (clone / "runs" / DIGITS_RUNS[0] / "checkpoints" / "best.ckpt").is_file()
    assert (clone / "runs" / DIGITS_RUNS[0] / "run.json").is_file()  # evaluate's link to MLflow


def test_changed_parameter_reruns_only_its_branch_as_a_dvc_experiment(repo_copy: Path):
    sh("dvc", "repro", *OFFLINE, cwd=repo_copy)  # up to date whatever ran before
    commit_all(repo_copy, "lock")
    change = ("-S", "runs.digits-lenet5.overrides='trainer.max_epochs=3'", "-n", "longer")
    every_run = [f"evaluate@{run}" for run in DIGITS_RUNS]
    experiment = sh("dvc", "exp", "run", *change, *every_run, cwd=repo_copy)
    assert ran(experiment.stdout) == {"train@digits-lenet5", "evaluate@digits-lenet5"}
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo_copy).stdout)
    experiments = [e for commit in shown for e in (commit.get("experiments") or [])]
    longer = [e for e in experiments if e["name"] == "longer"]
    assert longer, shown
    data = longer[0]["revs"][0]["data"]
    run = data["params"]["params.yaml"]["data"]["runs"]["digits-lenet5"]
    assert run["overrides"] == "trainer.max_epochs=3"
    assert "test_acc" in data["metrics"]["reports/digits-lenet5/metrics.json"]["data"]
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits").experiment_id
    epochs = {r.data.params["trainer.max_epochs"] for r in client.search_runs([experiment])}
    assert "3" in epochs
