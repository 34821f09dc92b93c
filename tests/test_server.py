"""The team tracking server: `python -m pipeline.server`, a real `mlflow server` on a real
PostgreSQL, on 127.0.0.1; trainings, sweeps and DDP log into it over HTTP, and an Optuna search
keeps its study in the same PostgreSQL."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.errors import PipelineError
from pipeline.tracking.server import LocalPostgres, postgres_bin
from pipeline.tracking.store import read_run
from pipeline.tracking.sweeps import PARENT_TAG, SCORE
from tests.conftest import env, free_port, needs
from tests.test_search import GOOD_AND_BAD, SEARCH, STUDY, first_best_trial

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("server")]


def postgres_installed() -> bool:
    try:
        postgres_bin()
    except PipelineError:
        return False
    return True


class Server:
    """`python -m pipeline.server ...` as a user starts it, stopped as SIGTERM stops it."""

    def __init__(self, workdir: Path, *overrides: str) -> None:
        self.workdir, self.port = workdir, free_port()
        self.overrides = (f"port={self.port}", "workers=1", *overrides)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.server", *self.overrides],
                cwd=self.workdir,
                env=env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 240
        while f"export MLFLOW_TRACKING_URI={self.url}" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no server after 240 s: " + self.log.read_text()
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def database_dir() -> Iterator[Path]:
    """A directory PostgreSQL's own user can reach when the tests run as root (pytest's
    temporary directories are private to their owner)."""
    needs(postgres_installed(), "PostgreSQL (Debian's postgresql: `make system-packages`)")
    directory = Path(tempfile.mkdtemp(prefix="convnet-pipeline-db-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def team_database(database_dir: Path) -> Iterator[tuple[str, str]]:
    """A team's own PostgreSQL: (URI with its password in it, the password)."""
    database = LocalPostgres(database_dir, free_port())
    database.start()
    password = database.passfile.read_text().strip().rsplit(":", 1)[1]
    yield database.uri.replace("mlflow@", f"mlflow:{password}@"), password
    database.stop()


def train(tmp: Path, data_dir: Path, uri: str, *overrides: str, wait: bool = True):
    """`python -m pipeline.train` from `tmp`, tracked at `uri` through the environment."""
    command = [sys.executable, "-m", "pipeline.train", f"paths.data_dir={data_dir}", *overrides]
    process = subprocess.Popen(
        command,
        cwd=tmp,
        env={**env(), "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if not wait:
        return process
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts: stopped when it ends, however it ends."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def test_sweep_and_ddp_training_log_into_the_server_and_read_back_over_http(
    tmp_path, data_dir, database_dir, servers
):
    # the project's own PostgreSQL, in a data_dir as `.server/` would be
    overrides = (f"data_dir={database_dir}", f"database_port={free_port()}")
    server = Server(tmp_path / "server", *overrides)
    servers.append(server.start())
    quick = ("trainer.max_epochs=1", "evaluation.scales=[1.0]", "data.batch_size=64")
    train(
        tmp_path,
        data_dir,
        server.url,
        *quick,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "model.head=fc,gap",
        "optimizer.lr=0.01,0.001",
        "-m",
    )
    # the DDP training's URI carries a password: it must never be written or shown
    secret_uri = server.url.replace("http://", "http://alice:s3cret-pw@")
    ddp_dir = tmp_path / "ddp"
    output = train(
        tmp_path,
        data_dir,
        secret_uri,
        *quick,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={ddp_dir}",
    )
    assert not (tmp_path / "mlruns").exists()  # everything went over HTTP

    client = MlflowClient(server.url)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.dir")]
    assert len(parents) == 1 and len(runs) == 6
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    assert len(children) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for run in children:
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 1
        assert SCORE in run.data.metrics
    ddp = client.get_run(read_run(ddp_dir)["run_id"])
    assert ddp.data.params["trainer.devices"] == "2"
    assert "train/loss_epoch" in ddp.data.metrics and "test/acc" in ddp.data.metrics
    downloaded = tmp_path / "downloaded"
    for remote, local in [
        ("evaluation/best.ckpt", ddp_dir / "checkpoints" / "best.ckpt"),
        ("evaluation/confusion.png", ddp_dir / "eval" / "confusion.png"),
    ]:
        copy = client.download_artifacts(ddp.info.run_id, remote, str(downloaded))
        assert sha256(Path(copy)) == sha256(local)

    assert "mlflow.tracking_uri" not in ddp.data.params  # the run's own address: in config.yaml
    config = client.download_artifacts(ddp.info.run_id, "config.yaml", str(downloaded))
    masked = server.url.replace("//", "//alice:***@")
    assert f"tracking_uri: {masked}" in Path(config).read_text()
    written = [Path(config), *(p for p in ddp_dir.rglob("*") if p.is_file())]
    leaks = [str(p) for p in written if b"s3cret-pw" in p.read_bytes()]
    assert not leaks and "s3cret-pw" not in output
    assert all("s3cret-pw" not in value for value in ddp.data.tags.values())

    server.stop()  # the project's PostgreSQL keeps its data across restarts
    server.start()
    again = MlflowClient(server.url).search_runs([parents[0].info.experiment_id])
    assert {r.info.run_id for r in again} == {r.info.run_id for r in runs}
    server.stop()


def test_a_training_outlives_a_server_restart_and_keeps_every_epoch(
    tmp_path, data_dir, team_database, servers
):
    uri, password = team_database
    server = Server(tmp_path / "server", f"backend_store_uri={uri}")
    servers.append(server.start())
    epochs = 12
    run_dir = tmp_path / "run"
    training = train(
        tmp_path,
        data_dir,
        server.url,
        f"trainer.max_epochs={epochs}",
        "data.batch_size=32",
        "optimizer=adam",
        f"hydra.run.dir={run_dir}",
        wait=False,
    )
    history = run_dir / "history.csv"
    deadline = time.monotonic() + 300
    while not (history.is_file() and history.read_text().count("\n") >= 3):  # 2 epochs done
        assert training.poll() is None and time.monotonic() < deadline, training.stdout.read()
        time.sleep(0.2)
    run_id = read_run(run_dir)["run_id"]
    before = len(MlflowClient(server.url).get_metric_history(run_id, "val/acc"))
    server.stop()
    time.sleep(10)
    assert training.poll() is None, "the training ended while the server was down"
    server.start()
    output = training.communicate(timeout=900)[0]
    assert training.returncode == 0, output[-4000:]

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    epochs_logged = [m.step for m in client.get_metric_history(run_id, "val/acc")]
    assert 1 <= before < epochs and len(set(epochs_logged)) == epochs
    assert len(client.get_metric_history(run_id, "train/loss_epoch")) == epochs
    server_output = server.log.read_text()
    assert password not in server_output and password not in output
    assert "postgresql+psycopg://mlflow@127.0.0.1" in server_output  # named without it
    server.stop()


def test_a_search_of_ddp_trials_prunes_through_its_study_in_the_servers_postgresql(
    tmp_path, data_dir, database_dir, servers, monkeypatch
):
    server = Server(tmp_path / "server", f"data_dir={database_dir}", f"database_port={free_port()}")
    servers.append(server.start())
    # the server names the studies' database, its password in libpq's file: as a user exports
    storage, passfile = re.search(
        r"^export OPTUNA_STORAGE=(\S+) PGPASSFILE=(\S+)$", server.log.read_text(), re.MULTILINE
    ).groups()
    monkeypatch.setenv("OPTUNA_STORAGE", storage)
    monkeypatch.setenv("PGPASSFILE", passfile)
    epochs = 4
    train(
        tmp_path,
        data_dir,
        server.url,
        *SEARCH,
        *GOOD_AND_BAD,
        f"trainer.max_epochs={epochs}",
        "hydra.sweeper.n_trials=4",  # one after another: 2 and 3 trail the median of 0 and 1
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "-m",
    )
    assert not (tmp_path / "mlruns").exists() and not list(tmp_path.rglob("optuna.db"))
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    client = MlflowClient(server.url)
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.params["trainer.devices"] == "2"
        curve = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        # rank 0 reported each epoch once; a pruned trial's ranks stopped together, early
        assert len(curve) == len(trial.intermediate_values) == len(set(curve))
        pruned = trial.state == TrialState.PRUNED
        assert run.info.status == ("KILLED" if pruned else "FINISHED")
        assert (len(curve) < epochs) if pruned else (len(curve) == epochs)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["optuna.storage"] == storage  # no password in it to mask
    assert parent.data.tags["best_run_id"] == first_best_trial(study).user_attrs["mlflow_run_id"]
    server.stop()
