"""DVC stage `fetch`: download a dataset's raw files and verify them against the config's md5s.

    python -m pipeline.data.fetch dataset=mnist [dataset.mirrors=[http://host/path/]]

Mirrors are tried in order. Everything is downloaded into a staging directory that becomes
`data/raw/NAME` only once every file matches its checksum, so a failed or corrupt download
leaves nothing a later stage could mistake for good data (and an earlier download as it was).
A mirror's failure moves on to the next mirror; a failure to write here (a full disk) ends the
stage at once, as no mirror can help with it.
"""

from __future__ import annotations

import errno
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
from pipeline.data.sources import SOURCES, RawSource, checksum_mismatches, describe_mismatch
from pipeline.data.store import atomic_directory
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# What a dead mirror, a dropped connection or a bad download raises inside torchvision.
DOWNLOAD_ERRORS = (OSError, RuntimeError, http.client.HTTPException)
# ...and what writing the download here raises: an error of this disk, not of the mirror
LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _diagnose(error: Exception | None, staging: Path, checksums: dict[str, str]) -> str | None:
    """Why one download attempt failed, or None if every file arrived intact."""
    mismatches = checksum_mismatches(staging, checksums)
    corrupt = [
        describe_mismatch(name, actual, checksums)
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
    attempts = ["the bundled copy"] if source.offline else cfg.mirrors
    failures = []
    for mirror in attempts:
        log.info("fetching %s from %s", cfg.name, mirror)
        error = None
        try:
            source.download(cfg, mirror, staging)
        except DOWNLOAD_ERRORS as err:
            if isinstance(err, OSError) and err.errno in LOCAL_ERRNOS:
                raise
            error = err
        failure = _diagnose(error, staging, cfg.checksums)
        if failure is None:
            return
        failures.append(f"{mirror}: {failure}")
        _clear(staging)
    if source.offline:
        hint = (
            "the bundled copy comes with an installed package: reinstall the versions uv.lock "
            f"pins (`make install`), or correct dataset.checksums in conf/dataset/{cfg.name}.yaml"
        )
    else:
        hint = (
            f"point dataset.mirrors (conf/dataset/{cfg.name}.yaml, or on the command line "
            f"dataset.mirrors=[http://host/path/]) at a mirror that serves "
            f"{', '.join(sorted(cfg.checksums))}"
        )
    tried = "; ".join(failures) if failures else "dataset.mirrors is empty"
    raise PipelineError(f"could not fetch dataset '{cfg.name}' ({tried}): {hint}")


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
