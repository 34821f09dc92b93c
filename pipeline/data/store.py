"""On-disk form of preprocessed data: one numpy `.npz` file per split plus `meta.json`.

Images are uint8 `N x C x H x W`, labels int64, and `index` the row each image had in the
source split it came from (so any sample can be traced back to the raw files). numpy writes
them, so the preprocess stage of the offline digits never imports torch; loading is a single
`np.load` per split, handed to torch without a copy. numpy and torch are imported by the
functions that save and load: the fetch stage uses `atomic_directory` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `target` only if the block succeeds.

    An interrupted or failed run leaves `target` as it was (or absent), never half-written:
    the staging directory sits beside it and is removed on failure.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the published directory private
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def split_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.npz"


def save_split(directory: Path, name: str, split: Split) -> None:
    import numpy as np

    np.savez(split_path(directory, name), **split._asdict())


def preprocessed(path: Path, what: str) -> Path:
    """`path`, a file the preprocess stage writes; if missing, an error naming the command."""
    if not path.is_file():
        raise PipelineError(
            f"no {what} in {path.parent}: run `dvc repro` or "
            f"`python -m pipeline.data.preprocess dataset={path.parent.name}` first"
        )
    return path


def load_split(directory: Path, name: str) -> Split:
    """A split as CPU tensors."""
    import numpy as np
    import torch

    path = preprocessed(split_path(directory, name), f"{name} split")
    with np.load(path) as arrays:
        return Split(*(torch.from_numpy(arrays[field]) for field in Split._fields))


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads(preprocessed(Path(directory) / META_FILE, "preprocessed data").read_text())
