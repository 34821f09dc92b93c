"""The catalogue of faults: what a user meets when something is wrong, one row each.

Every command row runs an entry point as a user would, after its `arrange` broke something in
a fresh workspace, and asserts the outcome a user can act on: exit status 1, no traceback,
one line that names the file, key or URL and says what to do (`says`: each piece in that one
line), within a generous bound (a hang fails), and nothing written or rewritten: every file
the workspace held before (data, checkpoints, the MLflow store) is byte for byte as it was.
Placeholders in `args`: {data} the preprocessed data, {store} the workspace's MLflow store,
{run} a finished training's output directory (copied into the workspace), {work} the
workspace, {port} a port another program listens on (opened by the row's `arrange`). A `dvc`
row runs `dvc ARGS` in a user's clone of this repository, whose `dvc repro` ends a failed
stage with status 255, the stage's own one line in its output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.data.store import load_split
from pipeline.errors import PipelineError
from pipeline.evaluation.logged_model import run_model_id
from pipeline.tracking.server import wait_healthy
from pipeline.tracking.store import read_run
from tests.conftest import REPO, cli, env, free_port, run_training
from tests.formats import md5, mnist_files
from tests.test_dvc import repo_copy, sh  # noqa: F401 (repo_copy: a fixture, for dvc_repo)

BOUND_S = 240  # a fault must end the command well within this: a hang fails the test


@dataclass
class Workspace:
    """A fresh directory the command runs in, with the paths its placeholders name."""

    work: Path
    data: Path  # the session's digits data; `own_data` copies it here before damaging it
    run: Path | None = None  # a finished training's output directory, when the row needs one
    listener: socket.socket | None = None  # holds {port} taken, for a row that needs one

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
        port = self.listener.getsockname()[1] if self.listener else None
        return arg.format(data=self.data, store=self.store, run=self.run, work=self.work, port=port)


def nothing(workspace: Workspace) -> None:
    """The fault is in the command's arguments alone."""


@dataclass(frozen=True)
class Fault:
    entry: str  # the module after `python -m pipeline.` (train with train.resume: a resume; dvc)
    fault: str  # what is wrong, as a user meets it
    args: tuple[str, ...]  # the command's arguments (placeholders filled in)
    says: tuple[str, ...]  # what the one-line error holds: the file, key or URL, what to do
    arrange: Callable[[Workspace], None] = nothing  # breaks something before the command
    needs_run: bool = False  # a finished training in {run} (its MLflow run in {store})
    hides: tuple[str, ...] = ()  # what the output must never show (a password)
    file_size_limit: int | None = None  # bytes a file may grow to: a full disk, without a mount
    may_change: tuple[str, ...] = ()  # files a command that started training may write

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.fault}"


# --- arrangements ----------------------------------------------------------------------------


def last_checkpoint(workspace: Workspace) -> Path:
    assert workspace.run is not None
    return workspace.run / "checkpoints" / "last.ckpt"


def truncate_checkpoint(workspace: Workspace) -> None:
    """A copy cut short (a full disk, an interrupted transfer)."""
    path = last_checkpoint(workspace)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_checkpoint(workspace: Workspace) -> None:
    """4 KB of noise inside the file's tensor data: torch reads it without complaint."""
    path = last_checkpoint(workspace)
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(content))


def truncate_unrecorded_checkpoint(workspace: Workspace) -> None:
    """A damaged checkpoint with no recorded checksum (as older versions wrote them)."""
    last_checkpoint(workspace).with_name("last.ckpt.sha256").unlink()
    truncate_checkpoint(workspace)


def write_checkpoint(workspace: Workspace, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The checkpoint's weights changed, and recorded as if written so (checksum included)."""
    path = last_checkpoint(workspace)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: change(v) for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name("last.ckpt.sha256").write_text(f"{digest}  last.ckpt\n")


def nan_checkpoint(workspace: Workspace) -> None:
    write_checkpoint(workspace, lambda tensor: tensor * float("nan"))


def server_gone(workspace: Workspace) -> None:
    """The training was recorded on a tracking server that no longer answers."""
    assert workspace.run is not None
    run_file = workspace.run / "run.json"
    run = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({**run, "tracking_uri": "http://127.0.0.1:9"}))


def exploding_checkpoint(workspace: Workspace) -> None:
    """Finite weights whose first step's loss is not: a checkpoint no training could use."""
    interrupt_run(workspace)
    write_checkpoint(
        workspace, lambda tensor: tensor * 1e30 if tensor.is_floating_point() else tensor
    )


def interrupt_run(workspace: Workspace) -> None:
    """The finished run's MLflow record as Ctrl-C leaves one: a resume may continue it."""
    run_id = json.loads((workspace.run / "run.json").read_text())["run_id"]
    MlflowClient(workspace.store).set_terminated(run_id, "KILLED")


def file_in_the_way(workspace: Workspace) -> None:
    (workspace.work / "afile").write_text("not a folder\n")


def text_store(workspace: Workspace) -> None:
    (workspace.work / "notes.db").write_text("my notes, not a database\n")


# train and resume arrangements end

# fetch: an MNIST-format mirror at file://{work}/mirror/ (the config allows file:// mirrors), of
# 12 generated images; the command names their md5s, as the config names the real ones
MNIST_FILES = mnist_files(
    (np.arange(10 * 28 * 28).reshape(10, 28, 28) % 256, np.arange(10) % 10),
    (np.arange(2 * 28 * 28).reshape(2, 28, 28) % 7, np.arange(2)),
)
MIRROR = "file://{work}/mirror/"
DEAD_MIRROR = "http://127.0.0.1:9/mnist/"


def fetch_mnist(*mirrors: str) -> tuple[str, ...]:
    """The arguments of a fetch of MNIST_FILES from `mirrors`, in order."""
    checksums = ",".join(f"{name}:{md5(content)}" for name, content in MNIST_FILES.items())
    return (
        "dataset=mnist",
        f"dataset.mirrors=[{','.join(mirrors)}]",
        f"dataset.checksums={{{{{checksums}}}}}",  # {{ }}: braces, once placeholders are filled
        "paths.data_dir={work}/data",
    )


TRAIN_IMAGES, TRAIN_LABELS, TEST_LABELS = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def mirror_serving(changed: dict[str, bytes]) -> Callable[[Workspace], None]:
    """An arrangement: the mirror serves MNIST_FILES, but these files with this content."""

    def arrange(workspace: Workspace) -> None:
        (workspace.work / "mirror").mkdir()
        for name, content in {**MNIST_FILES, **changed}.items():
            (workspace.work / "mirror" / name).write_bytes(content)

    return arrange


def own_data(workspace: Workspace) -> None:
    workspace.own_data()


def damaged(relative: str, change: Callable[[bytes], bytes]) -> Callable[[Workspace], None]:
    """An arrangement: the workspace's own copy of the data, its file `relative` changed."""

    def arrange(workspace: Workspace) -> None:
        workspace.own_data()
        path = workspace.data / relative
        path.write_bytes(change(path.read_bytes()))

    return arrange


def halved(content: bytes) -> bytes:
    """A copy cut short (a full disk, an interrupted transfer)."""
    return content[: len(content) // 2]


def relabelled(content: bytes) -> bytes:
    """A split saved again with other labels: a valid .npz, not the data preprocess wrote."""
    with np.load(io.BytesIO(content)) as split:
        arrays = dict(split)
    arrays["labels"] = (arrays["labels"] + 1) % 10
    saved = io.BytesIO()
    np.savez(saved, **arrays)
    return saved.getvalue()


def lose_best_checkpoint(workspace: Workspace) -> None:
    assert workspace.run is not None
    for path in (workspace.run / "checkpoints").glob("best.ckpt*"):
        path.unlink()


def limit_file_size(limit: int) -> None:
    """In the command's process, before it starts: no file may grow past `limit` bytes, so a
    write fails with EFBIG as on a full disk it fails with ENOSPC (SIGXFSZ ignored, as Python
    itself does, so that the write fails rather than the process being killed)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# data and evaluate arrangements end

# sweep: every trial's config is checked before the first starts; a trial started anyway would
# leave its records in {work}/sweep
SWEEP_INTO = "hydra.sweep.dir={work}/sweep"
# a search preset of the user's own, beside conf/hparams_search/digits_optuna.yaml
OWN_PRESET = """# @package _global_
defaults:
  - override /hydra/sweeper: optuna
hydra:
  sweeper:
    params:
      optimizer.lr: tag(log, interval(0.001, 0.1))
      model.head: choice(fc, gapp)
"""


def own_search_preset(workspace: Workspace) -> None:
    """OWN_PRESET as {work}/conf/hparams_search/mine.yaml (hydra.searchpath finds it)."""
    preset = workspace.work / "conf" / "hparams_search" / "mine.yaml"
    preset.parent.mkdir(parents=True)
    preset.write_text(OWN_PRESET)


def port_taken(workspace: Workspace) -> None:
    """Another program listens on {port}."""
    workspace.listener = socket.create_server(("127.0.0.1", 0))


# dvc: in a clone whose data stages ran, a run of params.yaml edited with a mistake
DVC_RUN = "digits-lenet5"


def dvc_run_with(key: str, value: object) -> Callable[[Workspace], None]:
    """An arrangement: DVC_RUN's `key` in params.yaml set to `value`."""

    def arrange(workspace: Workspace) -> None:
        params = OmegaConf.load(workspace.work / "params.yaml")
        params.runs[DVC_RUN][key] = value
        OmegaConf.save(params, workspace.work / "params.yaml")

    return arrange


# sweep, server and DVC arrangements end

# serve: each row's `args` names the images it posts to a served GAP model (SERVED_IMAGES, made
# from three real test digits, uint8 3 x 1 x 28 x 28); `says`: what the 400's message holds


def with_pixel(digits: torch.Tensor, value: int) -> torch.Tensor:
    """The digits with one pixel set to `value`, as integers (no uint8 holds it)."""
    pixels = digits.int()
    pixels[0, 0, 14, 14] = value
    return pixels


SERVED_IMAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "digits / 255": lambda digits: digits / 255,
    "a pixel of 300": lambda digits: with_pixel(digits, 300),
    "a pixel of -1": lambda digits: with_pixel(digits, -1),
    "4x4 crops": lambda digits: digits[..., :4, :4],
    "3 channels": lambda digits: digits.repeat(1, 3, 1, 1),
}


@pytest.fixture(scope="module")
def served_gap_model(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[str]:
    """`mlflow models serve` of a one-epoch GAP model (a refusal needs no accuracy): its URL."""
    tmp = tmp_path_factory.mktemp("served")
    _, output_dir, uri = run_training(
        tmp, data_dir, "model=lenet5_gap", "trainer.max_epochs=1", "train.evaluate=false"
    )
    model_id = run_model_id(MlflowClient(uri), read_run(output_dir)["run_id"])
    port = free_port()
    command = ["mlflow", "models", "serve", "-m", f"models:/{model_id}", "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    tools = Path(sys.executable).parent  # mlflow, and the uvicorn it starts
    path = f"{tools}{os.pathsep}{os.environ['PATH']}"
    log = tmp / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            command,
            cwd=tmp,
            env={**env(), "PATH": path, "MLFLOW_TRACKING_URI": uri},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, timeout=BOUND_S, path="/ping")
    except PipelineError as error:
        server.kill()
        pytest.fail(f"{error}\n{log.read_text()[-4000:]}")
    yield url
    server.terminate()
    server.wait(timeout=60)


def post(url: str, images: torch.Tensor) -> tuple[int, str]:
    """POST `images` to the served model as a JSON client does: (status, body)."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"inputs": images.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# serve arrangements end


# --- the catalogue ---------------------------------------------------------------------------

TRAIN = ("paths.data_dir={data}", "mlflow.tracking_uri={store}", "trainer.max_epochs=1")

# fmt: off
FAULTS = [
    # entry,  fault,  args,  says (all in one line of the output),  arrange
    Fault("train", "typo in a group option", (*TRAIN, "model=lenet6"), ("'model/lenet6'",)),
    Fault("train", "typo in a key's value", (*TRAIN, "model.head=gapp"), ("model.head", "fc, gap, spp")),
    Fault("train", "value out of range", (*TRAIN, "optimizer.lr=-1"), ("optimizer.lr", "0 < lr <= 10")),
    Fault("train", "misspelt key added", (*TRAIN, "+trainer.max_epoch=3"), ("max_epoch",)),
    Fault("train", "no preprocessed data", (*TRAIN, "paths.data_dir={work}/nodata"), ("no preprocessed data", "pipeline.data.preprocess dataset=digits")),
    Fault("train", "data split another way", (*TRAIN, "dataset.val_size=100"), ("val_size", "pipeline.data.preprocess dataset=digits dataset.val_size=100")),
    Fault("train", "store whose lock cannot be created", (*TRAIN, "mlflow.tracking_uri=sqlite:////proc/nope.db"), ("/proc", "choose a folder you can write")),
    Fault("train", "store path is a folder", (*TRAIN, "mlflow.tracking_uri=sqlite:///{work}"), ("{work} is a folder", "mlflow.db")),
    Fault("train", "store path under a file", (*TRAIN, "mlflow.tracking_uri=sqlite:///{work}/afile/mlflow.db"), ("{work}/afile is a file",), file_in_the_way),
    Fault("train", "store file is not a database", (*TRAIN, "mlflow.tracking_uri=sqlite:///{work}/notes.db"), ("notes.db is not a sqlite database",), text_store),
    Fault("train", "tracking server down", (*TRAIN, "mlflow.tracking_uri=http://127.0.0.1:9"), ("http://127.0.0.1:9", "make server", "mlflow.timeout_s")),
    Fault("train", "server down, password in its URI", (*TRAIN, "mlflow.tracking_uri=http://ann:s3cret@127.0.0.1:9"), ("ann:***@127.0.0.1:9",), hides=("s3cret",)),
    Fault("train", "bad server wait", (*TRAIN, "mlflow.timeout_s=0"), ("mlflow.timeout_s", "0 < seconds <= 600")),
    Fault("train", "resume where no training ran", (*TRAIN, "train.resume={work}"), ("train.resume", "no checkpoints/last.ckpt"), needs_run=True),
    Fault("train", "resume a finished run", (*TRAIN, "train.resume={run}"), ("finished", "start a new training"), needs_run=True),
    Fault("train", "resume with changed settings", (*TRAIN, "train.resume={run}", "optimizer.lr=0.05", "model.activation=tanh"), ("optimizer.lr 0.01 -> 0.05", "model.activation None -> tanh", "train.resume_changes"), interrupt_run, needs_run=True),
    Fault("train", "resume another model's folder", (*TRAIN, "train.resume={run}", "model=lenet5_gap"), ("model.head fc -> gap", "start a new training"), interrupt_run, needs_run=True),
    Fault("train", "resume changing what a resume cannot", (*TRAIN, "train.resume={run}", "train.resume_changes=[optimizer.lr]"), ("train.resume_changes", "trainer.max_epochs")),
    Fault("train", "resume a truncated checkpoint", (*TRAIN, "train.resume={run}"), ("last.ckpt is damaged", "sha256"), truncate_checkpoint, needs_run=True),
    Fault("train", "resume a garbled checkpoint", (*TRAIN, "train.resume={run}"), ("last.ckpt is damaged", "sha256"), garble_checkpoint, needs_run=True),
    Fault("train", "resume a truncated unrecorded checkpoint", (*TRAIN, "train.resume={run}"), ("last.ckpt cannot be read as a checkpoint",), truncate_unrecorded_checkpoint, needs_run=True),
    Fault("train", "resume a checkpoint of NaN weights", (*TRAIN, "train.resume={run}"), ("last.ckpt holds weights that are not finite",), nan_checkpoint, needs_run=True),
    Fault("train", "resume a checkpoint that diverges at once", (*TRAIN, "train.resume={run}", "train.resume_changes=[trainer.max_epochs]", "trainer.max_epochs=2"), ("first epoch after resuming", "checkpoint is suspect"), exploding_checkpoint, needs_run=True, may_change=("mlflow.db", "run/history.csv", "run/run.json")),
    Fault("evaluate", "its tracking server down", ("run_dir={run}", "paths.data_dir={data}"), ("http://127.0.0.1:9", "make server"), server_gone, needs_run=True),
    # train and resume rows end
    Fault("data.fetch", "mirror down, the next serves a truncated file", fetch_mnist(DEAD_MIRROR, MIRROR), (f"{DEAD_MIRROR}: ", "Connection refused", MIRROR, f"{TRAIN_IMAGES} has md5", "point dataset.mirrors"), mirror_serving({TRAIN_IMAGES: halved(MNIST_FILES[TRAIN_IMAGES])})),
    Fault("data.fetch", "mirror serves another file under the name", fetch_mnist(MIRROR), (MIRROR, f"{TEST_LABELS} has md5", "point dataset.mirrors"), mirror_serving({TEST_LABELS: MNIST_FILES[TRAIN_LABELS]})),
    Fault("data.fetch", "mirror without the files", fetch_mnist(MIRROR), (MIRROR, "No such file or directory", "point dataset.mirrors")),
    Fault("data.fetch", "bundled file is not the one the config pins", ("dataset.checksums={{digits.csv.gz:" + "0" * 32 + "}}", "paths.data_dir={work}/data"), ("digits.csv.gz has md5 9b335364a7bfd63947c7480a5bd51f2d, expected 000", "dataset.checksums in conf/dataset/digits.yaml")),
    Fault("data.fetch", "disk full", ("paths.data_dir={work}/data",), ("[Errno 27] File too large", "{work}/data/raw/digits"), file_size_limit=32_768),
    Fault("data.preprocess", "no raw files", ("paths.data_dir={work}/nodata",), ("{work}/nodata/raw/digits", "python -m pipeline.data.fetch dataset=digits paths.data_dir={work}/nodata")),
    Fault("data.preprocess", "raw file damaged since it was fetched", ("paths.data_dir={data}",), ("digits.csv.gz has md5", "python -m pipeline.data.fetch dataset=digits paths.data_dir={data}"), damaged("raw/digits/digits.csv.gz", halved)),
    Fault("data.preprocess", "disk full, over an earlier output", ("paths.data_dir={data}",), ("[Errno 27] File too large", "{data}/processed/digits"), own_data, file_size_limit=32_768),
    Fault("evaluate", "run_dir that does not exist", ("run_dir={work}/nowhere", "paths.data_dir={data}"), ("run_dir={work}/nowhere does not exist", "pass run_dir=DIR")),
    Fault("evaluate", "run_dir that no training wrote", ("run_dir={work}", "paths.data_dir={data}"), ("run_dir={work} is not a training's output", "pass run_dir=DIR")),
    Fault("evaluate", "best checkpoint missing", ("run_dir={run}", "paths.data_dir={data}"), ("no checkpoint checkpoints/best.ckpt in run_dir={run}", "checkpoint=FILE", "checkpoints/last.ckpt"), lose_best_checkpoint, needs_run=True),
    Fault("evaluate", "no preprocessed data", ("run_dir={run}", "paths.data_dir={work}/nodata"), ("no test split in {work}/nodata/processed/digits (test.npz)", "python -m pipeline.data.preprocess dataset=digits paths.data_dir={work}/nodata"), needs_run=True),
    Fault("evaluate", "test split truncated", ("run_dir={run}", "paths.data_dir={data}"), ("{data}/processed/digits/test.npz cannot be read", "BadZipFile", "python -m pipeline.data.preprocess dataset=digits"), damaged("processed/digits/test.npz", halved), needs_run=True),
    Fault("evaluate", "test split replaced by other data", ("run_dir={run}", "paths.data_dir={data}"), ("test.npz is not the test split", "sha256", "python -m pipeline.data.preprocess dataset=digits"), damaged("processed/digits/test.npz", relabelled), needs_run=True),
    Fault("evaluate", "meta.json garbled", ("run_dir={run}", "paths.data_dir={data}"), ("meta.json is not a meta.json that preprocess wrote", "JSONDecodeError", "python -m pipeline.data.preprocess dataset=digits"), damaged("processed/digits/meta.json", halved), needs_run=True),
    Fault("evaluate", "out_dir under a file", ("run_dir={run}", "out_dir={work}/afile/eval", "paths.data_dir={data}"), ("out_dir={work}/afile/eval cannot be written", "{work}/afile is a file"), file_in_the_way, needs_run=True),
    Fault("train", "train split truncated", TRAIN, ("train.npz cannot be read", "python -m pipeline.data.preprocess dataset=digits"), damaged("processed/digits/train.npz", halved)),
    # data and evaluate rows end
    Fault("train", "sweep: typo in a list", ("-m", *TRAIN, SWEEP_INTO, "model.head=fc,gapp"), ("sweep: config key 'model.head' = 'gapp'", "fc, gap, spp", "model.head=gapp", "No trial started")),
    Fault("train", "sweep: a value out of range", ("-m", *TRAIN, SWEEP_INTO, "model.head=fc,gap", "optimizer.lr=0.1,-1"), ("'optimizer.lr' = -1.0", "0 < lr <= 10", "model.head=fc optimizer.lr=-1")),
    Fault("train", "sweep: typo in a list of group options", ("-m", *TRAIN, SWEEP_INTO, "model=lenet5,lenet6"), ("'model/lenet6'", "allowed: alexnet", "lenet5_spp")),
    Fault("train", "sweep: a bad value among 40 trials, joblib", ("-m", *TRAIN, SWEEP_INTO, "hydra/launcher=joblib", "model=glob(*)", "optimizer.lr=0.1,0.05,0.01,0.001,0"), ("'optimizer.lr' = 0.0", "0 < lr <= 10")),
    Fault("train", "sweep: a value that is not a number", ("-m", *TRAIN, SWEEP_INTO, "data.batch_size=32,a"), ("data.batch_size=a", "'a' of type 'str' could not be converted to Integer")),
    Fault("train", "sweep: an interval without a search", ("-m", *TRAIN, SWEEP_INTO, "optimizer.lr=interval(0.01,0.1)"), ("optimizer.lr=interval(0.01,0.1) is not a list of values", "hydra/sweeper=optuna")),
    Fault("train", "search: typo in a choice", ("-m", *TRAIN, SWEEP_INTO, "hydra/sweeper=optuna", "model.head=choice(fc,gapp)"), ("search space: config key 'model.head' = 'gapp'", "fc, gap, spp")),
    Fault("train", "search: an interval's end out of range, joblib", ("-m", *TRAIN, SWEEP_INTO, "hparams_search=digits_optuna", "hydra/launcher=joblib", "optimizer.lr=interval(0.001,20)"), ("'optimizer.lr' = 20.0", "0 < lr <= 10")),
    Fault("train", "search: a range's start out of range", ("-m", *TRAIN, SWEEP_INTO, "hparams_search=digits_optuna", "data.batch_size=range(0,64,16)"), ("'data.batch_size' = 0", "an integer >= 1")),
    Fault("train", "search: typo in an own preset's params, joblib", ("-m", *TRAIN, SWEEP_INTO, "hydra.searchpath=[file://{work}/conf]", "hparams_search=mine", "hydra/launcher=joblib"), ("'model.head' = 'gapp'", "fc, gap, spp"), own_search_preset),
    Fault("server", "port in use", ("port={port}", "data_dir={work}/server"), ("127.0.0.1:{port}", "Address already in use", "port=A_FREE_PORT"), port_taken),
    Fault("server", "host not of this machine", ("host=192.0.2.1", "data_dir={work}/server"), ("192.0.2.1", "pass host=")),
    Fault("server", "team database unreachable", ("backend_store_uri=postgresql://mlflow:pw@127.0.0.1:9/mlflow", "data_dir={work}/server"), ("postgresql://mlflow:***@127.0.0.1:9/mlflow cannot be reached", "Connection refused", "start that database"), hides=("mlflow:pw@",)),
    Fault("server", "data_dir is a file", ("data_dir={work}/afile",), ("data_dir={work}/afile is a file", "pass data_dir="), file_in_the_way),
    Fault("dvc", "params.yaml: a run's model misspelt", ("repro", f"train@{DVC_RUN}"), ("'model/lenet6'",), dvc_run_with("model", "lenet6")),
    Fault("dvc", "params.yaml: a run of 0 epochs", ("repro", f"train@{DVC_RUN}"), ("'trainer.max_epochs' = 0", "an integer >= 1"), dvc_run_with("overrides", "trainer.max_epochs=0")),
    Fault("dvc", "params.yaml: an override out of range", ("repro", f"train@{DVC_RUN}"), ("'optimizer.lr' = 20.0", "0 < lr <= 10"), dvc_run_with("overrides", "optimizer.lr=20")),
    Fault("train", "sweep: tracking server down", ("-m", *TRAIN, SWEEP_INTO, "mlflow.tracking_uri=http://127.0.0.1:9", "model.head=fc,gap"), ("http://127.0.0.1:9", "make server")),
    Fault("train", "search: tracking server down", ("-m", *TRAIN, SWEEP_INTO, "mlflow.tracking_uri=http://127.0.0.1:9", "hydra/sweeper=optuna", "model.head=fc,gap"), ("http://127.0.0.1:9", "make server")),
    # sweep, server and DVC rows end
    Fault("serve", "floats in [0, 1]", ("digits / 255",), ("all 0 or 1", "uint8 pixels 0-255", "multiply by 255")),
    Fault("serve", "a pixel above 255", ("a pixel of 300",), ("300 out of bounds for uint8",)),
    Fault("serve", "a negative pixel", ("a pixel of -1",), ("-1 out of bounds for uint8",)),
    Fault("serve", "a 4x4 image", ("4x4 crops",), ("at least 1x12x12", "got 1x4x4")),
    Fault("serve", "RGB, not grey", ("3 channels",), ("(3, 3, 28, 28)", "(-1, 1, -1, -1)")),
    # serve rows end
]
# fmt: on


# --- the checks ------------------------------------------------------------------------------

# written for every command, whatever it does
TRANSIENT = (
    *(".hydra", ".log", "outputs", "multirun"),  # by Hydra: its config copy, log and run folders
    *(".lock", "-journal", "-wal", "-shm"),  # by sqlite while it works
    ".dvc/tmp",  # by dvc: its locks
)


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


@pytest.fixture(scope="module")
def dvc_repo(request: pytest.FixtureRequest) -> Path:
    """A user's clone of this repository (tests/test_dvc.py's copy) with its digits data stages
    run and nothing trained: a `dvc` row runs in a copy of it."""
    repo: Path = request.getfixturevalue("repo_copy")
    for outputs in ("runs", "reports"):  # what this checkout's own `dvc repro` left
        shutil.rmtree(repo / outputs, ignore_errors=True)
    sh("dvc", "repro", "preprocess@digits", cwd=repo)
    return repo


@pytest.fixture
def workspace(
    request: pytest.FixtureRequest, tmp_path: Path, data_dir: Path
) -> Iterator[Workspace]:
    fault: Fault = request.param
    space = Workspace(tmp_path / "work", data_dir)
    space.work.mkdir()
    if fault.needs_run:
        finished = request.getfixturevalue("finished_run")
        shutil.copytree(finished / "run", space.work / "run")
        shutil.copy(finished / "mlflow.db", space.work / "mlflow.db")
        space.run = space.work / "run"
    if fault.entry == "dvc":
        shutil.copytree(request.getfixturevalue("dvc_repo"), space.work, dirs_exist_ok=True)
    yield space
    if space.listener is not None:
        space.listener.close()


def one_line_error(output: str, says: tuple[str, ...]) -> str:
    """The line of `output` that holds every piece of `says`."""
    lines = [line for line in output.splitlines() if all(piece in line for piece in says)]
    assert lines, f"no line holds all of {says}:\n{output}"
    return lines[-1]


COMMANDS = [fault for fault in FAULTS if fault.entry != "serve"]
TOOLS = Path(sys.executable).parent  # this environment's python and dvc, as an activated one
EXIT_STATUS = {"dvc": 255}  # dvc's for a failed stage; every other entry point's: 1


def command(fault: Fault, workspace: Workspace) -> list[str]:
    """`python -m pipeline.ENTRY ARGS`, or for a dvc row `dvc ARGS`, placeholders filled."""
    args = [workspace.fill(arg) for arg in fault.args]
    if fault.entry == "dvc":
        return [str(TOOLS / "dvc"), *args]
    return [sys.executable, "-m", f"pipeline.{fault.entry}", *args]


@pytest.mark.parametrize(
    ("fault", "workspace"),
    [(f, f) for f in COMMANDS],
    ids=[f.id for f in COMMANDS],
    indirect=["workspace"],
)
def test_a_fault_ends_in_one_line_that_says_what_to_do(fault: Fault, workspace: Workspace):
    fault.arrange(workspace)
    before = snapshot(workspace.work)
    limit = fault.file_size_limit
    result = subprocess.run(
        command(fault, workspace),
        cwd=workspace.work,
        env={**env(), "PATH": f"{TOOLS}{os.pathsep}{os.environ['PATH']}"},  # dvc stages' python
        capture_output=True,
        text=True,
        timeout=BOUND_S,
        preexec_fn=None if limit is None else lambda: limit_file_size(limit),
    )
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_STATUS.get(fault.entry, 1), output
    assert "Traceback" not in output, output
    one_line_error(output, tuple(map(workspace.fill, fault.says)))
    assert not [secret for secret in fault.hides if secret in output], output
    after = snapshot(workspace.work)
    for written in fault.may_change:
        before.pop(written, None), after.pop(written, None)
    assert after == before, "the failed command changed what was there"


SERVED = [fault for fault in FAULTS if fault.entry == "serve"]


@pytest.mark.slow
@pytest.mark.xdist_group("serve")  # one training and one server for every row
@pytest.mark.parametrize("fault", SERVED, ids=[f.id for f in SERVED])
def test_the_served_model_refuses_what_it_cannot_read_with_a_400_that_says_why(
    fault: Fault, served_gap_model: str, data_dir: Path
):
    digits = load_split(data_dir / "processed" / "digits", "test").images[:3]
    status, body = post(served_gap_model, SERVED_IMAGES[fault.args[0]](digits))
    assert status == 400, body
    answer = json.loads(body)
    assert all(piece in answer["message"] for piece in fault.says), answer["message"]
    # what a stack trace shows: the server's code, its environment, the model's local copy
    assert "stack_trace" not in answer, body
    paths = (str(REPO), sys.prefix, "site-packages", tempfile.gettempdir())
    assert not [path for path in paths if path in body], body


def test_ctrl_c_ends_the_run_as_killed(tmp_path: Path, data_dir: Path):
    """Ctrl-C during a training stops it, and MLflow records that its user stopped it."""
    run_dir = tmp_path / "run"
    training = subprocess.Popen(
        cli(tmp_path, data_dir, "trainer.max_epochs=100", f"hydra.run.dir={run_dir}"),
        cwd=tmp_path,
        env=env(),
        # as in a terminal: Python turns SIGINT into KeyboardInterrupt unless it starts ignoring
        # it, as the children of pytest's workers would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + BOUND_S
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        assert training.poll() is None, training.stderr.read() if training.stderr else ""
        time.sleep(0.1)
    training.send_signal(signal.SIGINT)
    _, errors = training.communicate(timeout=BOUND_S)
    assert training.returncode == 1, errors
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(read_run(run_dir)["run_id"]).info.status == "KILLED"
