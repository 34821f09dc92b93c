"""The MLflow UI as a user sees it: `mlflow ui` over a store holding a trained, evaluated and
registered model, read by headless Chromium (Debian's `chromium`) after the page's scripts ran.
The runs table names the training, its page says first how good it is, and the registry's page
says the same of its model. Each page's screenshot is left in the test's folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.evaluation.logged_model import register
from pipeline.tracking.server import wait_healthy
from pipeline.tracking.store import read_run
from tests.conftest import free_port, needs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ui")]

VIEW = "workflowType=machine_learning"  # the model-training view (README)
WAIT_S = 120  # for the page to show what is asked; a bound for a hang, not for speed


class Browser:
    """Headless Chromium on `mlflow ui` at `url`; screenshots into `shots`."""

    def __init__(self, url: str, shots: Path) -> None:
        self.url, self.shots = url, shots

    def chromium(self, *options: str, page: str) -> subprocess.CompletedProcess:
        command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        command += ["--virtual-time-budget=15000", *options, f"{self.url}/#/{page}?{VIEW}"]
        return subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S)

    def shows(self, page: str, *texts: str, shot: str) -> str:
        """The page's rendered HTML once it shows every one of `texts` (or when the wait is
        over), its screenshot saved as `shot`.png."""
        deadline = time.monotonic() + WAIT_S
        while True:
            html = self.chromium("--dump-dom", page=page).stdout
            if all(text in html for text in texts) or time.monotonic() > deadline:
                break
        picture = self.shots / f"{shot}.png"
        self.chromium("--window-size=1600,1100", f"--screenshot={picture}", page=page)
        print(f"screenshot: {picture}")
        return html


@pytest.fixture(scope="module")
def ui(shared_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Browser, str]]:
    """A browser on `mlflow ui` over a copy of the shared run's store, its model registered as
    `dvc repro` registers it; and the run's id."""
    needs(
        shutil.which("chromium") is not None, "Chromium (Debian's chromium: `make system-packages`)"
    )
    _, output_dir, uri = shared_run
    folder = tmp_path_factory.mktemp("ui")
    shutil.copy(uri.removeprefix("sqlite:///"), folder / "mlflow.db")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    run_id = read_run(output_dir)["run_id"]
    register(MlflowClient(store), run_id, "digits-lenet5")
    port = free_port()
    with (folder / "ui.log").open("w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--backend-store-uri",
                store,
                "--port",
                str(port),
            ],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        yield Browser(f"http://127.0.0.1:{port}", folder), run_id
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_the_runs_table_names_the_training(ui, shared_run):
    browser, run_id = ui
    run = MlflowClient(shared_run[2]).get_run(run_id)
    html = browser.shows(
        f"experiments/{run.info.experiment_id}/runs", run.info.run_name, shot="runs"
    )
    assert run.info.run_name in html


def test_a_runs_page_says_first_how_good_its_model_is(ui, shared_run):
    browser, run_id = ui
    run = MlflowClient(shared_run[2]).get_run(run_id)
    accuracy = f"test accuracy {run.data.metrics['test/acc']:.2%}"
    page = f"experiments/{run.info.experiment_id}/runs/{run_id}"
    html = browser.shows(page, run.data.tags["mlflow.note.content"], shot="run")
    assert run.data.tags["mlflow.note.content"] in html and accuracy in html
    assert "test/acc_28px" in html and "smallest input 28 px" in html


def test_the_registry_says_how_good_its_champion_is(ui, shared_run):
    browser, run_id = ui
    run = MlflowClient(shared_run[2]).get_run(run_id)
    accuracy = f"test accuracy {run.data.metrics['test/acc']:.2%}"
    html = browser.shows("models/digits-lenet5", accuracy, shot="registry")
    # its description (markdown: "@champion" renders as a link) names its champion's figures
    assert "champion</a>: version 1." in html and accuracy in html
