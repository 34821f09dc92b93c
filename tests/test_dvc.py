"""The DVC pipeline in a fresh copy of the repository: the offline digits profile end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.util import source_from_cache
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.data.store import read_meta
from tests.conftest import REPO, train_config

# every test here runs DVC stages, in one repository copy
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc")]

OFFLINE = ("--glob", "evaluate@digits-*")
# two of the profile's runs (an fc and a gap head): every stage kind, half the processes
DIGITS_RUNS = ("digits-lenet5", "digits-lenet5_gap")


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools on PATH (and `env` added to the environment)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, **(env or {})}
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


# Imported by every Python process that finds it on PYTHONPATH. In a DVC stage's process (DVC
# sets DVC_STAGE and DVC_ROOT) it records each file under the repository opened for reading,
# imports included, into OPENED_DIR/STAGE.PID.
AUDIT = """
import os, sys
if "DVC_STAGE" in os.environ:
    root = os.path.join(os.environ["DVC_ROOT"], "")
    name = f"{os.environ['DVC_STAGE']}.{os.getpid()}"
    log = open(os.path.join(os.environ["OPENED_DIR"], name), "a")
    def record(event, args):
        path, mode, flags = args if event == "open" else (None, None, 0)
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        if isinstance(path, str):
            written = set(mode) & set("wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR)
            if not written and os.path.abspath(path).startswith(root):
                print(os.path.abspath(path), file=log, flush=True)
    sys.addaudithook(record)
"""


@pytest.fixture(scope="module")
def first_repro(repo_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The offline profile's first `dvc repro`, every stage's process audited by AUDIT: its
    output, and the folder of the files each stage opened."""
    site = tmp_path_factory.mktemp("audit")
    (site / "sitecustomize.py").write_text(AUDIT)
    opened = tmp_path_factory.mktemp("opened")
    env = {"PYTHONPATH": str(site), "OPENED_DIR": str(opened)}
    return sh("dvc", "repro", *OFFLINE, cwd=repo_copy, env=env).stdout, opened


def test_offline_profile_end_to_end_then_nothing_to_do(repo_copy: Path, first_repro):
    first, _ = first_repro
    expected = {"fetch@digits", "preprocess@digits"}
    expected |= {f"{stage}@{run}" for stage in ("train", "evaluate") for run in DIGITS_RUNS}
    assert ran(first) == expected
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
    experiment = client.get_experiment_by_name("digits").experiment_id
    runs = client.search_runs([experiment])
    # one name per training: its key names its run, its logged model and its registered model
    assert sorted(run.info.run_name for run in runs) == sorted(DIGITS_RUNS)
    assert sorted(m.name for m in client.search_logged_models([experiment])) == sorted(DIGITS_RUNS)
    for run in runs:  # evaluated once, by the evaluate stage, into the training's run
        logged = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/best.ckpt", "evaluation/metrics.json"} <= logged
        sizes = {f"test/acc_{size}px" for size in (14, 21, 28, 35, 42, 56, 70, 84)}
        assert sizes <= set(run.data.metrics)
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


# What a stage opens that is no input of it: git's records (MLflow tags a run with its commit)
# and the MLflow store, which the stages write.
NOT_INPUTS = (".git", "mlruns")


def test_every_file_a_stage_opens_is_in_its_deps_or_outs(repo_copy: Path, first_repro):
    _, opened = first_repro
    stages = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]
    by_stage: dict[str, set[Path]] = {}
    for log in opened.iterdir():
        # an import of a compiled module opens its cache: the module is its source
        by_stage.setdefault(log.name.rsplit(".", 1)[0], set()).update(
            Path(source_from_cache(path) if "__pycache__" in path else path)
            for path in log.read_text().splitlines()
        )
    assert by_stage.keys() == stages.keys()
    train = by_stage[f"train@{DIGITS_RUNS[0]}"]
    for name in ("conf/optimizer/sgd.yaml", "pipeline/registry.py", "pipeline/train.py"):
        assert repo_copy / name in train
    for stage, files in by_stage.items():
        entries = stages[stage]["deps"] + stages[stage]["outs"]
        covered = [repo_copy / entry["path"] for entry in entries]
        covered += [repo_copy / name for name in NOT_INPUTS]
        # files only: a staging folder renamed into an out is gone, and a path opened
        # relative to a folder's descriptor (shutil.rmtree) is none
        uncovered = {
            path.relative_to(repo_copy).as_posix()
            for path in files
            if path.is_file() and not any(path.is_relative_to(place) for place in covered)
        }
        assert not uncovered, f"{stage} opens files DVC does not track for it: {uncovered}"


def optimizers_used(repo: Path) -> dict[str, str]:
    """Each digits run's optimizer, as its training logged it to MLflow."""
    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    return {Path(r.data.tags["output_dir"]).name: r.data.params["optimizer.name"] for r in runs}


def test_editing_an_optimizer_reruns_the_trainings_that_use_it(repo_copy: Path):
    sh("dvc", "repro", *OFFLINE, cwd=repo_copy)  # up to date whatever ran before
    optimizers = optimizers_used(repo_copy)
    edited = repo_copy / "conf" / "optimizer" / f"{optimizers[DIGITS_RUNS[0]]}.yaml"
    text = edited.read_text()
    edited.write_text(text + "weight_decay: 0.0001\n")  # no digits recipe sets it
    try:
        dry = sh("dvc", "repro", "--dry", *OFFLINE, cwd=repo_copy).stdout
    finally:
        edited.write_text(text)
    # only the trainings: a dry run cannot know that their weights change, which re-runs their
    # evaluate stages
    assert ran(dry) == {f"train@{run}" for run, name in optimizers.items() if name == edited.stem}


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
