"""On-disk form of preprocessed data: one numpy `.npz` file per split plus `meta.json`.

Images are uint8 `N x C x H x W`, labels int64, and `index` the row each image had in the
source split it came from (so any sample can be traced back to the raw files). numpy writes
them, so the preprocess stage of the offline digits never imports torch; loading is a single
`np.load` per split, checked against the sha256 that meta.json records for it (one pass over
the arrays, as long again as reading them) and handed to torch without a copy. numpy and
torch are imported by the functions that save and load: the fetch stage uses
`atomic_directory` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.config import PathsConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import numpy as np
    import torch

    Array = np.ndarray | torch.Tensor

SPLITS = ("train", "val", "test")
META_FILE = "meta.json"


class Split(NamedTuple):
    """One split's arrays: numpy as preprocess builds them, torch tensors as loaded."""

    images: Array  # uint8, N x C x H x W
    labels: Array  # int64, N
    index: Array  # int64, N: row in the source split

    def sha256(self) -> str:
        import numpy as np

        digest = hashlib.sha256()
        for array in self:
            digest.update(np.ascontiguousarray(array))
        return digest.hexdigest()


@contextmanager
def _staging_beside(target: Path) -> Iterator[Path]:
    """An empty directory beside `target`, removed when the block ends, however it ends.

    An OSError in the block is raised again naming the output, not the staging directory that
    is gone by the time it is reported: a write that fails for want of space names no file at
    all (`[Errno 28] No space left on device`), an open that fails names a staged file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make a published directory private

    def published(name: str | None) -> str | None:
        return None if name is None else str(name).replace(str(staging), str(target), 1)

    try:
        yield staging
    except OSError as err:
        if err.errno is None:
            raise
        filename = published(err.filename) or str(target)
        raise OSError(err.errno, err.strerror, filename, None, published(err.filename2)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `target` only if the block succeeds.

    An interrupted or failed run leaves `target` as it was (or absent), never half-written:
    the staging directory sits beside it and is removed on failure, and the old `target` is
    moved aside, not deleted, until the new one is in its place.
    """
    with _staging_beside(target) as staging:
        yield staging
        old = staging.with_suffix(".old")
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_files(directory: Path) -> Iterator[Path]:
    """Yield an empty staging directory whose files move into `directory` only if the block
    succeeds: a failure leaves `directory` as it was. Unlike `atomic_directory`, files of
    `directory` that the block did not write stay (it may be a folder the user shares).
    """
    with _staging_beside(directory) as staging:
        yield staging
        directory.mkdir(exist_ok=True)
        for path in staging.iterdir():
            os.replace(path, directory / path.name)


def split_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.npz"


def save_split(directory: Path, name: str, split: Split) -> None:
    import numpy as np

    np.savez(split_path(directory, name), **split._asdict())


def data_command(stage: str, directory: Path) -> str:
    """The command that runs data stage `stage` for `data_dir/{raw,processed}/NAME`."""
    data_dir = Path(directory).parent.parent
    where = "" if data_dir == Path(PathsConfig.data_dir) else f" paths.data_dir={data_dir}"
    return f"`python -m pipeline.data.{stage} dataset={Path(directory).name}{where}`"


def rebuild_advice(directory: Path) -> str:
    """How to write a dataset's preprocessed files in `directory` again."""
    return f"run `dvc repro` or {data_command('preprocess', directory)} to write it again"


def preprocessed(path: Path, what: str) -> Path:
    """`path`, a file the preprocess stage writes; if missing, an error naming the command."""
    if not path.is_file():
        raise PipelineError(
            f"no {what} in {path.parent} ({path.name}): {rebuild_advice(path.parent)}"
        )
    return path


# what numpy raises for a split file that is truncated, overwritten or not an .npz at all
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def load_split(directory: Path, name: str) -> Split:
    """A split as CPU tensors, its arrays verified against the sha256 that meta.json records:
    a damaged or replaced file is an error naming it, not a zip error or silently other data."""
    import numpy as np
    import torch

    directory = Path(directory)
    path = preprocessed(split_path(directory, name), f"{name} split")
    expected = recorded_sha256(directory, name)
    try:
        with np.load(path) as arrays:
            split = Split(*(arrays[field] for field in Split._fields))
    except UNREADABLE as err:
        problem = f"{type(err).__name__}: {err}".splitlines()[0]
        raise PipelineError(
            f"{path} cannot be read ({problem}): {rebuild_advice(directory)}"
        ) from None
    if split.sha256() != expected:
        raise PipelineError(
            f"{path} is not the {name} split that {directory / META_FILE} records (its sha256 "
            f"differs): it changed after preprocessing; {rebuild_advice(directory)}"
        )
    return Split(*(torch.from_numpy(array) for array in split))


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: Path) -> dict[str, Any]:
    """meta.json as preprocess wrote it; a missing or garbled one is an error naming it."""
    directory = Path(directory)
    path = preprocessed(directory / META_FILE, "preprocessed data")
    try:
        meta = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        problem = f"{type(err).__name__}: {err}"
    else:
        if isinstance(meta, dict) and isinstance(meta.get("splits"), dict):
            return meta
        problem = "it records no splits"
    raise PipelineError(
        f"{path} is not a meta.json that preprocess wrote ({problem}): {rebuild_advice(directory)}"
    )


def recorded_sha256(directory: Path, name: str) -> str:
    """The sha256 of split `name`'s arrays, as preprocess recorded it in meta.json."""
    entry = read_meta(directory)["splits"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise PipelineError(
            f"{Path(directory) / META_FILE} records no sha256 for the {name} split: "
            f"{rebuild_advice(directory)}"
        )
    return entry["sha256"]
