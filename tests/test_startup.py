"""What each entry point imports before its work: the data stages and the summary never load
Lightning or MLflow, evaluate never loads Lightning, the results table (report) not even torch,
and a bad config fails before torch.
(How long they take: `python -m benchmarks.startup`, never a test.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "lightning", "torchmetrics", "torchvision", "mlflow", "sklearn")


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("pipeline.config", ()),
        ("pipeline.data.fetch", ()),
        ("pipeline.data.preprocess", ("torch",)),
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


@pytest.mark.parametrize(
    ("override", "named"), [("model=lenet6", "lenet5_classic"), ("model.head=mlp", "fc, gap, spp")]
)
def test_bad_config_is_rejected_before_torch_is_imported(override: str, named: str, tmp_path):
    command = [sys.executable, "-X", "importtime", "-m", "pipeline.train", override]
    # run elsewhere: Hydra's run directory (outputs/DATE/TIME) must not land in the repository
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert named in result.stdout + result.stderr
    imported = re.findall(r"^import time:.*\|\s*(\S+)$", result.stderr, flags=re.MULTILINE)
    assert "hydra" in imported and "torch" not in imported
