"""The catalogue of faults: what a user meets when something is wrong, one row each.

Every command row runs an entry point as a user would, after its `arrange` broke something in
a fresh workspace, and asserts the outcome a user can act on: exit status 1, no traceback,
one line that names the file, key or URL and says what to do (`says`: each piece in that one
line), within a generous bound (a hang fails), and nothing written or rewritten: every file
the workspace held before (data, checkpoints, the MLflow store) is byte for byte as it was.
Placeholders in `args`: {data} the preprocessed data, {store} the workspace's MLflow store,
{run} a finished training's output directory (copied into the workspace), {work} the
workspace.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, env, run_training

BOUND_S = 240  # a fault must end the command well within this: a hang fails the test


@dataclass
class Workspace:
    """A fresh directory the command runs in, with the paths its placeholders name."""

    work: Path
    data: Path  # the session's digits data; `own_data` copies it here before damaging it
    run: Path | None = None  # a finished training's output directory, when the row needs one

    @property
    def store(self) -> str:
        return f"sqlite:///{self.work / 'mlflow.db'}"

    def own_data(self) -> Path:
        """A private copy of the preprocessed data, for a row that damages it."""
        copy = self.work / "data"
        shutil.copytree(self.data, copy)
        self.data = copy
        return copy / "processed" / "digits"

    def fill(self, arg: str) -> str:
        return arg.format(data=self.data, store=self.store, run=self.run, work=self.work)


def nothing(workspace: Workspace) -> None:
    """The fault is in the command's arguments alone."""


@dataclass(frozen=True)
class Fault:
    entry: str  # the module after `python -m pipeline.` (train with train.resume: a resume)
    fault: str  # what is wrong, as a user meets it
    args: tuple[str, ...]  # the command's arguments (placeholders filled in)
    says: tuple[str, ...]  # what the one-line error holds: the file, key or URL, what to do
    arrange: Callable[[Workspace], None] = nothing  # breaks something before the command
    needs_run: bool = False  # a finished training in {run} (its MLflow run in {store})

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.fault}"


# --- arrangements ----------------------------------------------------------------------------

# train and resume arrangements end

# data and evaluate arrangements end

# sweep, server and DVC arrangements end

# serve arrangements end


# --- the catalogue ---------------------------------------------------------------------------

TRAIN = ("paths.data_dir={data}", "mlflow.tracking_uri={store}", "trainer.max_epochs=1")

FAULTS = [
    # entry, fault, args, says, arrange
    Fault("train", "typo in a group option", (*TRAIN, "model=lenet6"), ("'model/lenet6'",)),
    # train and resume rows end
    # data and evaluate rows end
    # sweep, server and DVC rows end
    # serve rows end
]


# --- the checks ------------------------------------------------------------------------------

# written by Hydra for every command (its config copy and log), and by sqlite while it works
TRANSIENT = (".hydra", ".log", ".lock", "-journal", "-wal", "-shm", "outputs", "multirun")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` but Hydra's and sqlite's own, by its sha256."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not any(part in str(path.relative_to(root)) for part in TRANSIENT)
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A one-epoch training that finished: its output directory beside its mlflow.db."""
    tmp = tmp_path_factory.mktemp("finished")
    run_training(tmp, data_dir, "trainer.max_epochs=1", "train.evaluate=false")
    return tmp


@pytest.fixture
def workspace(request: pytest.FixtureRequest, tmp_path: Path, data_dir: Path) -> Workspace:
    fault: Fault = request.param
    space = Workspace(tmp_path / "work", data_dir)
    space.work.mkdir()
    if fault.needs_run:
        finished = request.getfixturevalue("finished_run")
        shutil.copytree(finished / "run", space.work / "run")
        shutil.copy(finished / "mlflow.db", space.work / "mlflow.db")
        space.run = space.work / "run"
    return space


def one_line_error(output: str, says: tuple[str, ...]) -> str:
    """The line of `output` that holds every piece of `says`."""
    lines = [line for line in output.splitlines() if all(piece in line for piece in says)]
    assert lines, f"no line holds all of {says}:\n{output}"
    return lines[-1]


COMMANDS = [fault for fault in FAULTS if fault.entry != "serve"]


@pytest.mark.parametrize(
    ("fault", "workspace"), [(f, f) for f in COMMANDS], ids=[f.id for f in COMMANDS], indirect=["workspace"]
)
def test_a_fault_ends_in_one_line_that_says_what_to_do(fault: Fault, workspace: Workspace):
    fault.arrange(workspace)
    before = snapshot(workspace.work)
    command = [sys.executable, "-m", f"pipeline.{fault.entry}", *map(workspace.fill, fault.args)]
    result = subprocess.run(
        command, cwd=workspace.work, env=env(), capture_output=True, text=True, timeout=BOUND_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    one_line_error(output, tuple(map(workspace.fill, fault.says)))
    assert snapshot(workspace.work) == before, "the failed command changed what was there"
