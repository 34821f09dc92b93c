"""What each entry point imports before its work: the data stages and the summary never load
Lightning or MLflow, evaluate never loads Lightning, the results table (report) not even torch,
the offline digits are fetched and preprocessed without torch, and a bad config fails before
torch.
(How long they take: `python -m benchmarks.startup`, never a test.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "lightning", "torchmetrics", "torchvision", "mlflow", "sklearn")


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


def test_digits_data_stages_run_without_torch(tmp_path):
    for stage in ("fetch", "preprocess"):
        command = [sys.executable, "-X", "importtime", "-m", f"pipeline.data.{stage}"]
        imported, _ = imported_by([*command, "dataset=digits", f"paths.data_dir={tmp_path}"], REPO)
        assert "pipeline.data.store" in imported
        assert not {name.split(".")[0] for name in imported} & set(HEAVY)
    assert (tmp_path / "processed" / "digits" / "train.npz").is_file()


@pytest.mark.parametrize(
    ("override", "named"), [("model=lenet6", "lenet5_classic"), ("model.head=mlp", "fc, gap, spp")]
)
def test_bad_config_is_rejected_before_torch_is_imported(override: str, named: str, tmp_path):
    command = [sys.executable, "-X", "importtime", "-m", "pipeline.train", override]
    # run elsewhere: Hydra's run directory (outputs/DATE/TIME) must not land in the repository
    imported, output = imported_by(command, tmp_path, status=1)
    assert named in output
    assert "hydra" in imported and "torch" not in imported
