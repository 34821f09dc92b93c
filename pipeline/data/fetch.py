"""DVC stage `fetch`: download a dataset's raw files and verify them against the config's md5s.

    python -m pipeline.data.fetch dataset=mnist [dataset.mirrors=[http://host/path/]]

Mirrors are tried in order. Everything is downloaded into a staging directory that becomes
`data/raw/NAME` only once every file matches its checksum, so a failed or corrupt download
leaves nothing a later stage could mistake for good data.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from pipeline.cli import hydra_entry
from pipeline.config import DatasetConfig, PrepareJob, validate
from pipeline.data.sources import SOURCES, RawSource
from pipeline.data.store import atomic_directory
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# What a dead mirror, a dropped connection or a bad download raises inside torchvision.
DOWNLOAD_ERRORS = (OSError, RuntimeError, http.client.HTTPException)


def md5_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()


def checksum_mismatches(root: Path, checksums: dict[str, str]) -> dict[str, str | None]:
    """Configured files under `root` that are missing (None) or have another md5 (that md5)."""
    found = {path.name: path for path in root.rglob("*") if path.is_file()}
    mismatches: dict[str, str | None] = {}
    for name, expected in sorted(checksums.items()):
        if name not in found:
            mismatches[name] = None
        elif (actual := md5_of(found[name])) != expected:
            mismatches[name] = actual
    return mismatches


def _diagnose(error: Exception | None, staging: Path, checksums: dict[str, str]) -> str | None:
    """Why one download attempt failed, or None if every file arrived intact."""
    mismatches = checksum_mismatches(staging, checksums)
    corrupt = [
        f"{name} has md5 {actual}, expected {checksums[name]}"
        for name, actual in mismatches.items()
        if actual is not None
    ]
    if corrupt:
        return "checksum mismatch, download rejected (dataset.checksums): " + "; ".join(corrupt)
    if error is not None:  # torchvision nests the cause in its message: its last line says most
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return lines[-1] if lines else repr(error)
    if mismatches:
        return f"did not provide {', '.join(mismatches)}"
    return None


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every connect and read, so an unreachable mirror fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _try_mirrors(source: RawSource, cfg: DatasetConfig, staging: Path) -> None:
    """Fill `staging` from the first mirror that serves every file intact."""
    attempts = ["(bundled copy)"] if source.offline else cfg.mirrors
    failures = []
    for mirror in attempts:
        log.info("fetching %s from %s", cfg.name, mirror)
        error = None
        try:
            source.download(cfg, mirror, staging)
        except DOWNLOAD_ERRORS as err:
            error = err
        failure = _diagnose(error, staging, cfg.checksums)
        if failure is None:
            return
        failures.append(f"  - {mirror}: {failure}")
        _clear(staging)
    hint = (
        f"Point dataset.mirrors (conf/dataset/{cfg.name}.yaml, or on the command line "
        f"dataset.mirrors=[http://host/path/]) at a mirror that serves "
        f"{', '.join(sorted(cfg.checksums))}."
    )
    raise PipelineError(
        f"could not fetch dataset '{cfg.name}'; tried:\n"
        + ("\n".join(failures) if failures else "  (no mirrors: dataset.mirrors is empty)")
        + ("" if source.offline else "\n" + hint)
    )


def fetch(cfg: PrepareJob) -> Path:
    """Download and verify `cfg.dataset` into `data/raw/NAME`; return that directory."""
    dataset = cfg.dataset
    target = cfg.paths.raw_dir(dataset.name)
    if target.is_dir() and not checksum_mismatches(target, dataset.checksums):
        log.info("%s: raw files present and verified in %s", dataset.name, target)
        return target
    with socket_timeout(cfg.timeout_s), atomic_directory(target) as staging:
        _try_mirrors(SOURCES[dataset.source], dataset, staging)
    log.info("%s: raw files verified in %s", dataset.name, target)
    return target


@hydra_entry("data")
def main(cfg: DictConfig) -> None:
    fetch(validate(cfg, PrepareJob))


if __name__ == "__main__":
    main()
