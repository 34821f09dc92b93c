"""Sweeps whose trials are SLURM jobs (`hydra/launcher=slurm`), on a real two-node SLURM cluster
on loopback (tests/slurm.py: node names that are no host names, no accounting), on the real
digits data, run as the README says, with nothing added: trials that are 2-node DDP trainings
whose ranks SLURM starts and that meet at the address SLURM has for their first node; ranks
that cannot meet, failing their trials in bounded time; a trial cancelled before its result,
which ends the sweep instead of leaving it waiting; trials that SLURM requeues mid-training (at
their time limit, or preempted) and that resume in their own directory and MLflow run as if
nothing had happened; and an Optuna search whose trials, SLURM jobs, share a study in
PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.tracking.server import STUDIES, LocalPostgres
from pipeline.tracking.store import read_run
from pipeline.tracking.sweeps import SCORE
from tests.conftest import SHARED_RUN, cli, env, free_port, needs
from tests.slurm import NODES, SlurmCluster
from tests.test_search import SEARCH, STUDY
from tests.test_server import postgres_installed
from tests.test_sweeps import QUICK, assert_parent_records_the_best, sweep_runs, trials
from tests.test_train import TWO_NODES, val_curve

# every test here runs sweeps on the cluster; bounds for a hang, not for speed. One worker
# runs them all, on one cluster: two clusters (one a worker) number their jobs alike, and
# Lightning gives a SLURM job's DDP rendezvous the port 15000 + its id's last 4 digits, so
# two clusters' trials would meet on the same port of 127.0.0.1
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800), pytest.mark.xdist_group("slurm")]
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
    cluster: SlurmCluster,
    tmp: Path,
    data_dir: Path,
    *overrides: str,
    exported: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """A sweep of SLURM jobs into `tmp`/sweep, tracked in `tmp`/mlflow.db, its output in
    `tmp`/sweep.log, from a shell that has `exported` these variables."""
    command = cli(
        tmp, data_dir, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp / 'sweep'}", *overrides, "-m"
    )
    environment = {**cluster.environment(env()), **(exported or {})}
    with (tmp / "sweep.log").open("w") as output:
        return subprocess.Popen(command, cwd=tmp, env=environment, stdout=output, stderr=output)


def ended(sweep: subprocess.Popen) -> int:
    """The sweep's exit status, once it ended (killed if it outlives the wait)."""
    try:
        return sweep.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        sweep.kill()
        return sweep.wait()


def finish(sweep: subprocess.Popen, cluster: SlurmCluster, tmp: Path) -> None:
    """Wait for the sweep; it must succeed."""
    assert ended(sweep) == 0, what_happened(cluster, tmp)


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


def test_sweep_of_two_node_ddp_trials_gives_each_trial_one_dir_and_one_run(
    slurm, tmp_path, data_dir
):
    for node in NODES:  # SLURM's names for this machine, which no resolver knows
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(node, None)
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
        assert "rank 0 of 2 on node n1" in log and "rank 1 of 2 on node n2" in log
        # n1 is no host name: rank 0's address is n1's NodeAddr, as SLURM has it
        assert "rank 0 at 127.0.0.1" in log
    assert {r.data.tags["slurm.nodes"] for r in children} == {"n[1-2]"}
    # each trial a task of the sweep's job array (ARRAYID_TASK), named so in submitit's folders
    folders = (sweep_dir / ".submitit").iterdir()
    jobs = {p.name for p in folders if re.fullmatch(r"\d+_\d+", p.name)}
    assert {r.data.tags["slurm.job_id"] for r in children} == jobs and len(jobs) == 2
    # a task's process ends a few seconds after the result the sweep waits for
    assert [wait_for_state(slurm, job, "COMPLETED") for job in jobs] == ["COMPLETED"] * 2
    # only rank 0 recorded its trial
    assert [t["status"] for t in trials(sweep_dir)] == ["COMPLETED", "COMPLETED"]
    assert_parent_records_the_best(client, parent, children)


def test_ranks_that_cannot_meet_fail_their_trials_in_bounded_time_and_say_where(
    slurm, tmp_path, data_dir
):
    # a MASTER_ADDR the user exported wins over SLURM's address; this one never resolves
    unreachable = "rank0.invalid"
    sweep = start_sweep(
        slurm,
        tmp_path,
        data_dir,
        *TWO_NODES,
        *QUICK,
        "trainer.ddp_timeout_s=8",
        "optimizer.lr=0.01,0.02",
        exported={"MASTER_ADDR": unreachable},
    )
    assert ended(sweep) == 1, what_happened(slurm, tmp_path)

    output = (tmp_path / "sweep.log").read_text()
    assert "Traceback" not in output
    said = [line for line in output.splitlines() if "could not reach each other" in line]
    assert len(said) == 1, output
    assert f"at {unreachable}:" in said[0] and "trainer.ddp_timeout_s=8 s" in said[0]
    # each trial's run holds its settings and ended FAILED; the parent closed
    _, parent, children = sweep_runs(tmp_path)
    assert [r.info.status for r in children] == ["FAILED", "FAILED"]
    assert {r.data.params["optimizer.lr"] for r in children} == {"0.01", "0.02"}
    assert parent.info.status == "FAILED"
    recorded = trials(tmp_path / "sweep")
    assert [t["status"] for t in recorded] == ["FAILED", "FAILED"]
    assert all(unreachable in t["error"] for t in recorded)
    assert {t["run_id"] for t in recorded} == {r.info.run_id for r in children}


def test_a_trial_killed_before_its_result_ends_the_sweep_saying_so(slurm, tmp_path, data_dir):
    # without accounting, submitit learns that a job ended only from its result; trial 0, long,
    # is cancelled once it trains, trial 1 runs to its end
    quick = ("evaluation.scales=[1.0]", "mlflow.log_checkpoint=false")
    sweep = start_sweep(slurm, tmp_path, data_dir, *quick, "trainer.max_epochs=100,1")
    trial = tmp_path / "sweep" / "0"
    deadline = time.monotonic() + WAIT_S
    while not (trial / "history.csv").exists() and time.monotonic() < deadline:
        if sweep.poll() is not None:
            break
        time.sleep(0.1)
    assert (trial / "history.csv").exists(), what_happened(slurm, tmp_path)
    (cancelled,) = [
        job for job in slurm.run("squeue", "-h", "-o", "%i").split() if job[-2:] == "_0"
    ]
    slurm.run("scancel", cancelled)
    assert ended(sweep) == 1, what_happened(slurm, tmp_path)

    output = (tmp_path / "sweep.log").read_text()
    assert "Traceback" not in output
    (said,) = [line for line in output.splitlines() if "without a result" in line]
    assert f"SLURM job {cancelled} ended CANCELLED" in said and said.count("SLURM job") == 1
    _, parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FAILED"
    status = {r.data.tags["slurm.job_id"]: r.info.status for r in children}
    assert len(status) == 2 and status.pop(cancelled) == "FAILED"
    assert list(status.values()) == ["FINISHED"]  # the other trial ran to its end
    recorded = {t["status"]: t for t in trials(tmp_path / "sweep")}
    assert sorted(recorded) == ["COMPLETED", "FAILED"]
    assert recorded["FAILED"]["run_id"] == read_run(trial)["run_id"]
    assert recorded["FAILED"]["job"] == 0 and cancelled in recorded["FAILED"]["error"]


def user_package(tmp: Path, name: str, source: str) -> dict[str, str]:
    """The user's package `name` (its __init__ is `source`), and the PYTHONPATH a user would
    export for it."""
    package = tmp / "src" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join([str(package.parent), env()["PYTHONPATH"]])}


# Networks of the user's own package (`model.backbone._target_`), LeNet-5's maps each:
# - PacedLeNet pauses before each batch: a training of about 100 s spent mostly asleep, which
#   outlasts its SLURM job's first 75 s on any machine and leaves the cores to the other tests;
# - RequeuingLeNet, in its job's first attempt, at training batch `at_batch`, has SLURM requeue
#   the job and fails at once: what a rank does whose peers SLURM stopped first ("Connection
#   closed by peer"), before SLURM stops it too.
USER_NETS = """
import os
import subprocess
import time

from torch import nn


class LeNetMaps(nn.Sequential):
    def __init__(self, in_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        )


class PacedLeNet(LeNetMaps):
    def __init__(self, in_channels: int, pause_s: float) -> None:
        super().__init__(in_channels)
        self.pause_s = pause_s

    def forward(self, x):
        time.sleep(self.pause_s)
        return super().forward(x)


class RequeuingLeNet(LeNetMaps):
    def __init__(self, in_channels: int, at_batch: int) -> None:
        super().__init__(in_channels)
        self.batches_left = at_batch

    def forward(self, x):
        if self.training and "SLURM_RESTART_COUNT" not in os.environ:
            self.batches_left -= 1
            if self.batches_left == 0:
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
                raise RuntimeError("Connection closed by peer")
        return super().forward(x)
"""


def test_a_trial_failing_as_slurm_requeues_it_leaves_no_result_and_its_next_attempt_finishes(
    slurm, tmp_path, data_dir
):
    # 1,137 training images in batches of 64: 18 steps an epoch; the requeue comes in epoch 2
    exported = user_package(tmp_path, "user_nets", USER_NETS)
    sweep = start_sweep(
        slurm,
        tmp_path,
        data_dir,
        "model.backbone={_target_:user_nets.RequeuingLeNet,in_channels:1,at_batch:24}",
        "data.batch_size=64",
        "trainer.max_epochs=3",
        "evaluation.scales=[1.0]",
        "mlflow.log_checkpoint=false",
        exported=exported,
    )
    finish(sweep, slurm, tmp_path)

    trial = tmp_path / "sweep" / "0"
    log = (trial / "train.log").read_text()
    (stopped,) = [line for line in log.splitlines() if "SLURM stopped this attempt" in line]
    assert "restarts=1" in stopped and "it ends without a result" in stopped
    assert "SLURM restarted this job" in log
    assert [t["status"] for t in trials(tmp_path / "sweep")] == ["COMPLETED"]
    _, _, children = sweep_runs(tmp_path)
    assert [r.info.status for r in children] == ["FINISHED"]
    (job,) = {r.data.tags["slurm.job_id"] for r in children}
    assert "Restarts=1" in slurm.run("scontrol", "show", "job", job)
    assert torch.load(trial / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 54


# 18 training and 5 validation batches an epoch, a quarter second each
EPOCHS = 16
TIME_LIMITED = (
    "model.backbone={_target_:user_nets.PacedLeNet,in_channels:1,pause_s:0.25}",
    "optimizer=adam",
    "data.batch_size=64",
    "trainer.threads=1",
    f"trainer.max_epochs={EPOCHS}",
    "evaluation.scales=[1.0]",
)


def test_trial_at_its_time_limit_is_requeued_until_it_finishes_as_if_uninterrupted(
    slurm, tmp_path, data_dir
):
    exported = user_package(tmp_path, "user_nets", USER_NETS)
    # SLURM signals a job signal_delay_s to signal_delay_s + 30 s before its time limit (it looks
    # every 30 s): here 45 to 75 s after it starts; submitit then requeues it, as often as needed
    sweep = start_sweep(
        slurm,
        tmp_path,
        data_dir,
        *TIME_LIMITED,
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=45",
        "hydra.launcher.max_num_timeout=10",
        exported=exported,
    )
    # the same training, uninterrupted, here beside it
    straight = tmp_path / "straight"
    straight.mkdir()
    command = cli(straight, data_dir, *TIME_LIMITED, f"hydra.run.dir={straight / 'run'}")
    reference = subprocess.run(
        command, cwd=straight, env=env() | exported, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    finish(sweep, slurm, tmp_path)

    trial = tmp_path / "sweep" / "0"
    client, _, children = sweep_runs(tmp_path)
    (run,) = children
    assert run.info.status == "FINISHED" and read_run(trial)["run_id"] == run.info.run_id
    (job,) = {r.data.tags["slurm.job_id"] for r in children}
    restarts = int(slurm.run("scontrol", "show", "job", job).split("Restarts=")[1].split()[0])
    assert restarts >= 1
    log = (trial / "train.log").read_text()
    assert log.count("this job is timed-out") == restarts  # submitit's word for the signal
    assert log.count("SLURM restarted this job") == restarts
    assert [t["status"] for t in trials(tmp_path / "sweep")] == ["COMPLETED"]
    resumed_curve = val_curve(client, run.info.run_id)
    assert len(resumed_curve) == EPOCHS
    straight_client = MlflowClient(f"sqlite:///{straight / 'mlflow.db'}")
    assert resumed_curve == val_curve(straight_client, read_run(straight / "run")["run_id"])


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


def test_preempted_trial_resumes_in_its_dir_and_run_and_matches_an_uninterrupted_training(
    straight_ddp_run, slurm, tmp_path, data_dir
):
    # 1,137 training images in batches of 64 over two ranks: 9 steps an epoch
    steps_per_epoch = 9
    sweep = start_sweep(slurm, tmp_path, data_dir, *SHARED_RUN, *TWO_NODES)
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

    straight_dir, straight_uri = straight_ddp_run
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
