"""Sweeps whose trials are SLURM jobs (`hydra/launcher=slurm`), on a real two-node SLURM cluster
on loopback (tests/slurm.py), on the real digits data: trials that are 2-node DDP trainings
whose ranks SLURM starts, and a trial that SLURM requeues mid-training and that resumes in its
own directory and MLflow run as if nothing had happened, and an Optuna search whose trials, SLURM
jobs, share a study in PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.tracking.server import STUDIES, LocalPostgres
from pipeline.tracking.store import read_run
from pipeline.tracking.sweeps import SCORE
from tests.conftest import SHARED_RUN, cli, env, needs
from tests.slurm import SlurmCluster
from tests.test_search import SEARCH, STUDY
from tests.test_server import free_port, postgres_installed
from tests.test_sweeps import QUICK, assert_parent_records_the_best, sweep_runs, trials
from tests.test_train import val_curve

# every test here runs sweeps on the cluster; bounds for a hang, not for speed
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
WAIT_S = 900


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The cluster, for the whole session. Without SLURM installed the tests are skipped, saying
    why; under CI (CI=true) they fail instead."""
    missing = [name for name in ("slurmctld", "slurmd", "sbatch") if shutil.which(name) is None]
    if missing:
        reason = (
            f"SLURM is not installed ({', '.join(missing)} not on PATH): `make test` installs "
            "slurm-wlm where it runs as root with apt-get"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture
def slurm(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster, left without jobs by each test, whatever its outcome."""
    yield cluster
    cluster.cancel_jobs()


def start_sweep(
    cluster: SlurmCluster, tmp: Path, data_dir: Path, *overrides: str
) -> subprocess.Popen:
    """A sweep of SLURM jobs into `tmp`/sweep, tracked in `tmp`/mlflow.db, its output in
    `tmp`/sweep.log."""
    command = cli(
        tmp, data_dir, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp / 'sweep'}", *overrides, "-m"
    )
    with (tmp / "sweep.log").open("w") as output:
        return subprocess.Popen(
            command, cwd=tmp, env=cluster.environment(env()), stdout=output, stderr=output
        )


def finish(sweep: subprocess.Popen, cluster: SlurmCluster, tmp: Path) -> None:
    """Wait for the sweep; it must succeed."""
    try:
        sweep.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        sweep.kill()
        sweep.wait()
    assert sweep.returncode == 0, what_happened(cluster, tmp)


def what_happened(cluster: SlurmCluster, tmp: Path) -> str:
    """The sweep's output, its jobs' (submitit's logs) and the SLURM daemons' logs."""
    logs = [tmp / "sweep.log", *sorted((tmp / "sweep" / ".submitit").rglob("*_log.*"))]
    tails = [f"==> {path} <==\n{path.read_text(errors='replace')[-3000:]}" for path in logs]
    return "\n".join([*tails, cluster.logs()])


def job_state(cluster: SlurmCluster, job: str) -> str:
    return cluster.run("scontrol", "show", "job", "-o", job).split("JobState=")[1].split()[0]


def wait_for_state(cluster: SlurmCluster, job: str, state: str) -> str:
    """The job's state once it is `state`, or when the wait is over."""
    deadline = time.monotonic() + WAIT_S
    while job_state(cluster, job) != state and time.monotonic() < deadline:
        time.sleep(0.1)
    return job_state(cluster, job)


# DDP over both nodes, a rank on each; node1 and node2 are the names SLURM knows this machine
# by, not host names, so rank 0's address is given
TWO_NODES = (
    'hydra.launcher.setup=["export MASTER_ADDR=127.0.0.1"]',
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.num_nodes=2",
    "trainer.devices=1",
)


def test_sweep_of_two_node_ddp_trials_gives_each_trial_one_dir_and_one_run(
    slurm, tmp_path, data_dir
):
    sweep = start_sweep(
        slurm, tmp_path, data_dir, *TWO_NODES, *QUICK, "data.batch_size=64", "model.head=fc,gap"
    )
    finish(sweep, slurm, tmp_path)

    client, parent, children = sweep_runs(tmp_path)
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.params["model.head"] for r in children} == {"fc", "gap"}
    assert parent.data.tags["sweep.launcher"] == "SlurmLauncher"
    # both tasks of a trial ran its job in its directory: no other directory anywhere but the
    # store's artifacts (digits/, beside its database)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["digits", "sweep"]
    sweep_dir = tmp_path / "sweep"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [".submitit", "0", "1"]
    trial_dirs = [sweep_dir / "0", sweep_dir / "1"]
    assert {read_run(d)["run_id"] for d in trial_dirs} == {r.info.run_id for r in children}
    for trial in trial_dirs:
        # 1,137 training images over one process group of 2 ranks (one a node): 569 per
        # rank, 9 batches of 64
        last = torch.load(trial / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 9
        log = (trial / "train.log").read_text()  # both tasks log into their trial's log
        assert "rank 0 of 2 on node node1" in log and "rank 1 of 2 on node node2" in log
    assert {r.data.tags["slurm.nodes"] for r in children} == {"node[1-2]"}
    # each trial a task of the sweep's job array (ARRAYID_TASK), named so in submitit's folders
    folders = (sweep_dir / ".submitit").iterdir()
    jobs = {p.name for p in folders if re.fullmatch(r"\d+_\d+", p.name)}
    assert {r.data.tags["slurm.job_id"] for r in children} == jobs and len(jobs) == 2
    # a task's process ends a few seconds after the result the sweep waits for
    assert [wait_for_state(slurm, job, "COMPLETED") for job in jobs] == ["COMPLETED"] * 2
    # only rank 0 recorded its trial
    assert [t["status"] for t in trials(sweep_dir)] == ["COMPLETED", "COMPLETED"]
    assert_parent_records_the_best(client, parent, children)


@pytest.fixture(scope="module")
def straight_ddp_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, str]:
    """(output dir, tracking URI) of the shared run's settings as an uninterrupted 2-rank DDP
    training on this machine (torch's elastic launcher, no SLURM)."""
    tmp = tmp_path_factory.mktemp("straight_ddp")
    ddp = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    command = cli(tmp, data_dir, *SHARED_RUN, *ddp, f"hydra.run.dir={tmp / 'run'}")
    result = subprocess.run(command, cwd=tmp, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "run", f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.mark.parametrize(
    ("overrides", "uninterrupted", "steps_per_epoch"),
    [
        # 1,137 training images in batches of 64: 18 steps an epoch, 9 over two ranks
        pytest.param((), "shared_run", 18, id="one-task"),
        pytest.param(TWO_NODES, "straight_ddp_run", 9, id="rank-on-each-node"),
    ],
)
def test_requeued_trial_resumes_in_its_dir_and_run_and_matches_an_uninterrupted_training(
    overrides, uninterrupted, steps_per_epoch, request, slurm, tmp_path, data_dir
):
    sweep = start_sweep(slurm, tmp_path, data_dir, *SHARED_RUN, *overrides)
    trial = tmp_path / "sweep" / "0"
    last = trial / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + WAIT_S
    while not last.exists() and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert last.exists(), what_happened(slurm, tmp_path)
    (job,) = slurm.run("squeue", "-h", "-o", "%i").split()
    run_id = read_run(trial)["run_id"]

    slurm.run("scontrol", "requeue", job)  # what preemption does
    # once its processes are gone, it waits to start again
    assert wait_for_state(slurm, job, "PENDING") == "PENDING", what_happened(slurm, tmp_path)
    interrupted_at = torch.load(last, weights_only=True)["epoch"]
    assert interrupted_at < 4, "the training finished before it could be requeued"
    finish(sweep, slurm, tmp_path)

    assert wait_for_state(slurm, job, "COMPLETED") == "COMPLETED"
    assert "Restarts=1" in slurm.run("scontrol", "show", "job", job)
    assert "SLURM restarted this job" in (trial / "train.log").read_text()
    assert read_run(trial)["run_id"] == run_id
    assert torch.load(last, weights_only=True)["global_step"] == 5 * steps_per_epoch
    client, _, children = sweep_runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in children] == [(run_id, "FINISHED")]
    assert [t["status"] for t in trials(tmp_path / "sweep")] == ["COMPLETED"]

    straight_dir, straight_uri = request.getfixturevalue(uninterrupted)[-2:]
    resumed_curve = val_curve(client, run_id)
    every_epoch = [steps_per_epoch * epoch - 1 for epoch in range(1, 6)]
    assert sorted(resumed_curve) == every_epoch
    straight = val_curve(MlflowClient(straight_uri), read_run(straight_dir)["run_id"])
    assert resumed_curve == straight


@pytest.fixture
def studies_database() -> Iterator[str]:
    """The project's PostgreSQL (as `make server` runs it) and its studies' database: the URI
    a user exports as OPTUNA_STORAGE, its password in libpq's file (PGPASSFILE)."""
    needs(postgres_installed(), "PostgreSQL (Debian's postgresql: `make system-packages`)")
    directory = Path(tempfile.mkdtemp(prefix="convnet-pipeline-studies-"))
    directory.chmod(0o755)  # reachable by PostgreSQL's own user when the tests run as root
    database = LocalPostgres(directory, free_port())
    database.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSFILE", str(database.passfile))
        patch.setenv("OPTUNA_STORAGE", database.database_uri(STUDIES))
        yield database.database_uri(STUDIES)
    database.stop()
    shutil.rmtree(directory)


def test_a_search_of_slurm_jobs_shares_its_postgresql_study(
    slurm, studies_database, tmp_path, data_dir
):
    sweep = start_sweep(
        slurm, tmp_path, data_dir, *SEARCH, "trainer.max_epochs=2", "hydra.sweeper.n_trials=2"
    )
    finish(sweep, slurm, tmp_path)

    study = optuna.load_study(study_name=STUDY, storage=studies_database)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    client, parent, children = sweep_runs(tmp_path)
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert parent.data.tags["sweep.launcher"] == "SlurmLauncher"
    assert not list(tmp_path.rglob("optuna.db"))  # the study lives in PostgreSQL only
    for trial in trials:  # each a SLURM job that reported its epochs and result to the study
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["slurm.job_id"] and run.data.tags["optuna.state"] == "COMPLETE"
        assert len(trial.intermediate_values) == 2
        assert run.data.metrics[SCORE] == pytest.approx(trial.value)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
