"""`dvc repro` of the offline digits stages in a fresh copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.store import read_meta
from tests.conftest import REPO


def sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The working tree's files that git would commit, as a new git repository."""
    listed = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO)
    copy = tmp_path / "repo"
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    sh("git", "init", "-q", cwd=copy)
    sh("git", "add", "-A", cwd=copy)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy", cwd=copy)
    return copy


@pytest.mark.slow
def test_dvc_repro_digits_then_nothing_to_do(repo_copy: Path):
    first = sh("dvc", "repro", "preprocess@digits", cwd=repo_copy)
    assert "Running stage 'fetch@digits'" in first.stdout
    assert "Running stage 'preprocess@digits'" in first.stdout
    meta = read_meta(repo_copy / "data" / "processed" / "digits")
    assert [meta["splits"][s]["count"] for s in ("train", "val", "test")] == [1137, 300, 360]

    second = sh("dvc", "repro", "preprocess@digits", cwd=repo_copy)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date." in second.stdout
    status = sh("dvc", "status", "preprocess@digits", cwd=repo_copy)
    assert "up to date" in status.stdout
