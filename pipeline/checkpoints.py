"""Checkpoint files a training can trust: written whole, checked when read, never diverged.

The training writes them through `pipeline.training.checkpoint_io`; evaluation and a resume
read them here, without Lightning.

Each checkpoint gets a `NAME.sha256` beside it (sha256sum's format: `sha256sum -c` checks it
too), written when the checkpoint is, and compared before the checkpoint is used: torch reads
a file with damaged tensor bytes without complaint. A checkpoint is first written to a
temporary name and then renamed, so a killed save leaves the last one whole (while it is
renamed, the checksum file lists the old and the new file's); and weights that are not finite
are never written at all, so a diverged epoch cannot replace the checkpoint it would have to be
resumed from.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError


def checksum_file(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}.sha256")


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def weights_finite(state_dict: dict[str, Any]) -> bool:
    return all(
        bool(torch.isfinite(value).all())
        for value in state_dict.values()
        if torch.is_tensor(value) and value.is_floating_point()
    )


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed to it when the block succeeds."""
    staging = path.with_name(f".{path.name}.tmp")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def recorded_checksums(path: Path) -> list[str]:
    recorded = checksum_file(path)
    lines = recorded.read_text().splitlines() if recorded.is_file() else []
    return [line.split()[0] for line in lines if line.strip()]


def record_checksums(path: Path, digests: list[str]) -> None:
    with staged(checksum_file(path)) as staging:
        staging.write_text("".join(f"{digest}  {path.name}\n" for digest in digests))


def verify_checkpoint(path: Path) -> None:
    """Raise a PipelineError unless `path` is a checkpoint whose bytes are those written."""
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path}: pass a training's checkpoint file")
    recorded = checksum_file(path)
    if not recorded.is_file():
        return  # written before checksums were recorded: torch's own reading is the check
    if sha256(path) not in recorded_checksums(path):
        raise PipelineError(
            f"{path} is damaged: its sha256 differs from the one recorded when it was written "
            f"({recorded.name}); restore the file, or start a new training"
        )


def read_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A verified checkpoint's contents; a PipelineError naming an unreadable one."""
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch reports a damaged archive as a RuntimeError, pickle's own...
        raise PipelineError(
            f"{path} cannot be read as a checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); restore the file, or start a new training"
        ) from err
