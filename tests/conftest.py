"""Shared fixtures: the repository's paths, a loopback HTTP mirror, the real digits data, and
CLI runners."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import compose_config
from pipeline.config import DatasetConfig, PrepareJob, TrainJob
from pipeline.data.fetch import fetch
from pipeline.data.preprocess import preprocess
from pipeline.training.fit import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def own_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test names its own MLflow store. Lightning's MLFlowLogger calls
    mlflow.set_tracking_uri, which also exports MLFLOW_TRACKING_URI to every later
    subprocess: unset, a test's store cannot leak into the next test's `dvc repro`."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


class Mirror:
    """A real HTTP server on 127.0.0.1 serving files from a directory, as a dataset mirror."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def put(self, name: str, content: bytes) -> None:
        (self.root / name).write_bytes(content)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    root.mkdir()
    served = Mirror(root)
    served.thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


def run_module(
    module: str, *overrides: str, cwd: Path = REPO, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m module overrides...` as a user would, with the venv's tools on PATH;
    a run past `timeout_s` (a hang) fails the test."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: the workers share the long ones from the start, rather than one of
    them running the last long test alone while the others have nothing left."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real digits data, fetched and preprocessed by the pipeline's own stages."""
    directory = tmp_path_factory.mktemp("data")
    stage = compose_config("data", PrepareJob, ["dataset=digits", f"paths.data_dir={directory}"])
    fetch(stage)
    preprocess(stage)
    return directory


@functools.cache
def _store_made_once() -> tempfile.TemporaryDirectory:
    """A directory holding an MLflow store whose tables MLflow made: once per test process."""
    directory = tempfile.TemporaryDirectory(prefix="convnet-pipeline-store-")
    MlflowClient(f"sqlite:///{Path(directory.name) / 'mlflow.db'}").search_experiments()
    return directory


def store_uri(tmp: Path) -> str:
    """The URI of `tmp`/mlflow.db, a store as a user's is after their first training: a copy of
    one made once, as making a store's tables takes longer than a short training's epochs. A
    store's first use is tested where it is new: `make demo`, DVC, the tracking server."""
    store = tmp / "mlflow.db"
    if not store.exists():
        shutil.copy(Path(_store_made_once().name) / "mlflow.db", store)
    return f"sqlite:///{store}"


def cli(tmp: Path, data_dir: Path, *overrides: str) -> list[str]:
    """`python -m pipeline.train` on `data_dir`, tracked in `tmp`/mlflow.db."""
    return [
        sys.executable,
        "-m",
        "pipeline.train",
        f"paths.data_dir={data_dir}",
        f"mlflow.tracking_uri={store_uri(tmp)}",
        *overrides,
    ]


def train_config(*overrides: str) -> TrainJob:
    return compose_config("config", TrainJob, overrides)


def run_training(
    tmp: Path, data_dir: Path, *overrides: str, extra_callbacks: Sequence[L.Callback] = ()
) -> tuple[dict, Path, str]:
    """Train in-process; returns (metrics, output dir, tracking URI)."""
    uri = store_uri(tmp)
    cfg = train_config(f"paths.data_dir={data_dir}", f"mlflow.tracking_uri={uri}", *overrides)
    output_dir = tmp / "run"
    return train(cfg, output_dir, extra_callbacks=extra_callbacks), output_dir, uri


# 5 x 18 steps on digits, step metrics every 5: the run the read-only tests share
SHARED_RUN = (
    "trainer.max_epochs=5",
    "data.batch_size=64",
    "optimizer=adam",
    "trainer.log_every_n_steps=5",
)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """One LeNet-5 training, for the tests that only read what a training leaves. Its system
    metrics are sampled every half second (MLflow's knob), so that a short training has some."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        return run_training(tmp_path_factory.mktemp("shared"), data_dir, *SHARED_RUN)


def needs(available: bool, what: str) -> None:
    """Skip a test whose system component is missing, saying which; in CI (CI=true) fail."""
    if not available:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is missing, and CI=true requires it")
        pytest.skip(f"needs {what}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def env() -> dict[str, str]:
    """A CLI subprocess's environment: this checkout first on the path, then the caller's."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


def dataset_config(shape: tuple[int, int, int] = MNIST, classes: int = 10) -> DatasetConfig:
    """A dataset config of the given image shape and class count, for building networks."""
    channels, height, width = shape
    return DatasetConfig(
        name="test",
        source="MNIST",
        channels=channels,
        height=height,
        width=width,
        classes=[str(i) for i in range(classes)],
        val_size=0,
    )
