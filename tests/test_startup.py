"""What each entry point imports before its work: the data stages and the summary never load
Lightning or MLflow, evaluate never loads Lightning, the results table (report) not even torch,
every dataset is fetched and preprocessed without torch, and a bad config fails before torch.
(How long they take: `python -m benchmarks.startup`, never a test.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, Mirror
from tests.formats import checksums_override, cifar_batches, mnist_files, tar_gz

HEAVY = ("torch", "lightning", "torchmetrics", "mlflow", "sklearn")


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("pipeline.config", ()),
        ("pipeline.data.fetch", ()),
        ("pipeline.data.preprocess", ()),
        ("pipeline.summary", ("torch",)),
        ("pipeline.evaluate", ("torch", "mlflow")),
        ("pipeline.report", ("mlflow",)),
        ("pipeline.train", ()),  # the training's imports come after the config is validated
    ],
)
def test_entry_point_imports_only_what_it_uses(module: str, allowed: tuple[str, ...]):
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == set(allowed)


def imported_by(command: list[str], cwd: Path, status: int = 0) -> tuple[list[str], str]:
    """The modules `python -X importtime` saw `command` import, and its output."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    return re.findall(r"^import time:.*\|\s*(\S+)$", result.stderr, flags=re.MULTILINE), output


def served(dataset: str, mirror: Mirror) -> list[str]:
    """Overrides that fetch `dataset` from `mirror`, now serving a few random images in the
    upstream format (digits come from the installed scikit-learn)."""
    if dataset == "digits":
        return []
    rng = np.random.default_rng(0)
    shape = (28, 28) if dataset == "mnist" else (3, 32, 32)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        return images, rng.integers(0, 10, count, dtype=np.uint8)

    if dataset == "mnist":
        downloads, unpacked = mnist_files(split(12), split(4)), {}
    else:
        unpacked = cifar_batches(split(12), split(4), [str(i) for i in range(10)])
        downloads = {"cifar-10-python.tar.gz": tar_gz(unpacked, "cifar-10-batches-py")}
    for name, content in downloads.items():
        mirror.put(name, content)
    pinned = checksums_override({**downloads, **unpacked})
    return [f"dataset.mirrors=[{mirror.url}]", pinned, "dataset.val_size=2"]


@pytest.mark.parametrize("dataset", ["digits", "mnist", "cifar10"])
def test_data_stages_run_without_torch(dataset: str, mirror: Mirror, tmp_path):
    overrides = [f"dataset={dataset}", f"paths.data_dir={tmp_path}", *served(dataset, mirror)]
    for stage in ("fetch", "preprocess"):
        command = [sys.executable, "-X", "importtime", "-m", f"pipeline.data.{stage}"]
        imported, _ = imported_by([*command, *overrides], REPO)
        assert "pipeline.data.store" in imported
        assert not {name.split(".")[0] for name in imported} & set(HEAVY)
    assert (tmp_path / "processed" / dataset / "train.npz").is_file()


@pytest.mark.parametrize(
    ("override", "named"), [("model=lenet6", "lenet5_classic"), ("model.head=mlp", "fc, gap, spp")]
)
def test_bad_config_is_rejected_before_torch_is_imported(override: str, named: str, tmp_path):
    command = [sys.executable, "-X", "importtime", "-m", "pipeline.train", override]
    # run elsewhere: Hydra's run directory (outputs/DATE/TIME) must not land in the repository
    imported, output = imported_by(command, tmp_path, status=1)
    assert named in output
    assert "hydra" in imported and "torch" not in imported
