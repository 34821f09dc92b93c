"""DVC stage `fetch`: download a dataset's raw files and verify them against the config's md5s.

    python -m pipeline.data.fetch dataset=mnist [dataset.mirrors=[http://host/path/]]

Every file `dataset.checksums` names is fetched as BASE_URL + NAME from the first mirror (tried
in order) that serves them all intact, its md5 checked as it arrives, its progress logged when
it takes long; an archive (CIFAR's tar.gz) is unpacked with the standard library, and the files
it holds are not fetched again. A dataset that an installed package bundles
(`dataset.package`) is copied from its installation instead, checked alike. Everything lands in
a staging directory that becomes `data/raw/NAME` only once every file matches its checksum, so
a failed or corrupt download leaves nothing a later stage could mistake for good data (and an
earlier download as it was). A mirror's failure moves on to the next mirror; a failure to write
here (a full disk) ends the stage at once, as no mirror can help with it.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import importlib.metadata
import logging
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from pipeline.cli import hydra_entry
from pipeline.config import DatasetConfig, PrepareJob, validate
from pipeline.data.sources import checksum_mismatches, describe_mismatch, files_by_name
from pipeline.data.store import atomic_directory
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# What a dead mirror, a dropped connection or a bad archive raises (URLError, socket timeouts
# and shutil's ReadError are OSErrors)...
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, tarfile.TarError)
# ...and what writing the download here raises: an error of this disk, not of the mirror
LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
# file names that shutil.unpack_archive unpacks (.tar.gz, .zip, ...; not MNIST's plain .gz)
ARCHIVES = tuple(ext for _, extensions, _ in shutil.get_unpack_formats() for ext in extensions)
PROGRESS_EVERY_S = 10.0
CHUNK_BYTES = 1 << 20


class MirrorFailure(Exception):
    """Why one mirror (or the installed package) could not provide every file intact."""


def _url(cfg: DatasetConfig, origin: str, name: str) -> str:
    """Where `origin` keeps the file `name`: under a mirror's base URL, or in the installed
    package (found among the distribution's files rather than by importing it)."""
    if cfg.package is None:
        return origin + name
    try:
        bundled = [
            file for file in importlib.metadata.files(cfg.package) or [] if file.name == name
        ]
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{cfg.package} is not installed") from None
    if not bundled:
        raise FileNotFoundError(f"the installed {cfg.package} has no {name}")
    return Path(bundled[0].locate()).resolve().as_uri()


def _download(url: str, target: Path, timeout_s: float) -> str:
    """Stream `url` into `target`, logging progress every PROGRESS_EVERY_S; return its md5."""
    digest, done = hashlib.md5(), 0
    next_report = time.monotonic() + PROGRESS_EVERY_S
    with urllib.request.urlopen(url, timeout=timeout_s) as response, target.open("wb") as out:
        size = response.headers.get("Content-Length")
        of_size = f" of {int(size) / 1e6:.1f}" if size else ""
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if time.monotonic() >= next_report:
                log.info("%s: %.1f%s MB", target.name, done / 1e6, of_size)
                next_report += PROGRESS_EVERY_S
    if size and done != int(size):
        raise MirrorFailure(f"{target.name} arrived truncated ({done} of {size} bytes)")
    return digest.hexdigest()


def _reason(err: Exception) -> str:
    """An error in words: urllib wraps a connection's failure, whose reason says most."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        return str(err.reason)
    return str(err) or type(err).__name__


def _fetch_from(origin: str, cfg: PrepareJob, staging: Path) -> None:
    """Fill `staging` with every configured file from `origin`, or raise MirrorFailure."""
    checksums = cfg.dataset.checksums
    for name in sorted(checksums, key=lambda name: not name.endswith(ARCHIVES)):
        if name in files_by_name(staging):  # unpacked from an archive fetched before it
            continue
        try:
            actual = _download(_url(cfg.dataset, origin, name), staging / name, cfg.timeout_s)
            if actual != checksums[name]:
                raise MirrorFailure(
                    "checksum mismatch, download rejected (dataset.checksums): "
                    + describe_mismatch(name, actual, checksums)
                )
            if name.endswith(ARCHIVES):
                shutil.unpack_archive(staging / name, staging, filter="data")
        except DOWNLOAD_ERRORS as err:
            if isinstance(err, OSError) and err.errno in LOCAL_ERRNOS:
                raise
            raise MirrorFailure(f"{name}: {_reason(err)}") from err
    if unpacked := checksum_mismatches(staging, checksums):
        found = "; ".join(describe_mismatch(n, md5, checksums) for n, md5 in unpacked.items())
        raise MirrorFailure(f"checksum mismatch, archive rejected (dataset.checksums): {found}")


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _try_mirrors(cfg: PrepareJob, staging: Path) -> None:
    """Fill `staging` from the first mirror that serves every file intact."""
    dataset = cfg.dataset
    origins = [f"the installed {dataset.package}"] if dataset.package else dataset.mirrors
    failures = []
    for origin in origins:
        log.info("fetching %s from %s", dataset.name, origin)
        try:
            _fetch_from(origin, cfg, staging)
            return
        except MirrorFailure as failure:
            failures.append(f"{origin}: {failure}")
        _clear(staging)
    where = f"conf/dataset/{dataset.name}.yaml"
    if dataset.package:
        hint = (
            f"the files come with the installed {dataset.package}: reinstall the versions "
            f"uv.lock pins (`make install`), or correct dataset.checksums in {where}"
        )
    else:
        hint = (
            f"point dataset.mirrors ({where}, or on the command line "
            f"dataset.mirrors=[http://host/path/]) at a mirror that serves "
            f"{', '.join(sorted(dataset.checksums))}, or correct dataset.checksums there if "
            f"upstream changed the files"
        )
    tried = "; ".join(failures) if failures else "dataset.mirrors is empty"
    raise PipelineError(f"could not fetch dataset '{dataset.name}' ({tried}): {hint}")


def fetch(cfg: PrepareJob) -> Path:
    """Download and verify `cfg.dataset` into `data/raw/NAME`; return that directory."""
    dataset = cfg.dataset
    target = cfg.paths.raw_dir(dataset.name)
    if target.is_dir() and not checksum_mismatches(target, dataset.checksums):
        log.info("%s: raw files present and verified in %s", dataset.name, target)
        return target
    with atomic_directory(target) as staging:
        _try_mirrors(cfg, staging)
    log.info("%s: raw files verified in %s", dataset.name, target)
    return target


@hydra_entry("data")
def main(cfg: DictConfig) -> None:
    fetch(validate(cfg, PrepareJob))


if __name__ == "__main__":
    main()
