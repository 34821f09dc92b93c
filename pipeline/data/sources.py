"""Raw-data sources: readers of the upstream file formats, and the md5 check of raw files.

A source is a function that reads a dataset's raw files (found by name, wherever under its raw
directory they are) as uint8 arrays, registered under the name `dataset.source` selects. The
fetch stage gets the files themselves, from the mirrors or an installed package the config
names. This module imports only the standard library (readers import numpy when they run), so
config validation imports it to check `dataset.source` against the registered names: a new
format is one reader here, a new dataset in a known format one YAML naming its reader.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pipeline.errors import ConfigError, PipelineError
from pipeline.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from pipeline.config import DatasetConfig


class RawData(NamedTuple):
    train_images: np.ndarray  # uint8 N x C x H x W
    train_labels: np.ndarray  # int64 N
    test_images: np.ndarray | None  # None: the source has no official test split
    test_labels: np.ndarray | None


class RawFiles(dict[str, Path]):
    """A dataset's verified raw files by name. A reader that asks for one the config has no
    md5 for is told to list it: an unlisted file would be read unverified."""

    def __missing__(self, name: str) -> Path:
        raise ConfigError(
            f"the dataset's source reads '{name}', which dataset.checksums does not list: add "
            f"its md5 to dataset.checksums (conf/dataset/)"
        )


Reader = Callable[["DatasetConfig", RawFiles], RawData]
SOURCES: Registry[Reader] = Registry("data source")


def files_by_name(root: Path) -> dict[str, Path]:
    """Every file under `root` by its name, at any depth (archives extract into folders)."""
    return {path.name: path for path in root.rglob("*") if path.is_file()}


def md5_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()


def checksum_mismatches(root: Path, checksums: dict[str, str]) -> dict[str, str | None]:
    """Configured files under `root` that are missing (None) or have another md5 (that md5)."""
    found = files_by_name(root)
    mismatches: dict[str, str | None] = {}
    for name, expected in sorted(checksums.items()):
        if name not in found:
            mismatches[name] = None
        elif (actual := md5_of(found[name])) != expected:
            mismatches[name] = actual
    return mismatches


def describe_mismatch(name: str, actual: str | None, checksums: dict[str, str]) -> str:
    """One entry of `checksum_mismatches`, in words."""
    if actual is None:
        return f"{name} is missing"
    return f"{name} has md5 {actual}, expected {checksums[name]}"


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (LeCun's MNIST format: two zero bytes, type 0x08,
    the number of dimensions, each dimension as a big-endian uint32, the data) as an array."""
    import numpy as np

    content = gzip.decompress(path.read_bytes())
    ndim = content[3] if len(content) > 3 else 0
    start = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", content[4:start]) if len(content) >= start else ()
    if content[:3] != b"\0\0\x08" or not shape or len(content) != start + math.prod(shape):
        raise PipelineError(f"{path} is not an IDX file of unsigned bytes")
    return np.frombuffer(content, dtype=np.uint8, offset=start).reshape(shape)


@SOURCES.register("FashionMNIST")  # the source that fashion_mnist's meta.json records
@SOURCES.register("MNIST")
def read_mnist(cfg: DatasetConfig, files: RawFiles) -> RawData:
    """MNIST-format datasets: four gzipped IDX files, images N x H x W and labels N."""
    import numpy as np

    def split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(files[f"{prefix}-images-idx3-ubyte.gz"])
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte.gz"])
        return images[:, None], labels.astype(np.int64)

    return RawData(*split("train"), *split("t10k"))


@SOURCES.register("CIFAR10")
def read_cifar10(cfg: DatasetConfig, files: RawFiles) -> RawData:
    """CIFAR-10's python version: pickled batches of 3 x 32 x 32 images, channel-major rows."""
    import numpy as np

    def batches(*names: str) -> tuple[np.ndarray, np.ndarray]:
        loaded = []
        for name in names:
            with files[name].open("rb") as file:  # verified against its md5 before reading
                loaded.append(pickle.load(file, encoding="latin1"))  # written by Python 2
        images = np.concatenate([np.asarray(batch["data"], dtype=np.uint8) for batch in loaded])
        labels = np.concatenate([np.asarray(batch["labels"], dtype=np.int64) for batch in loaded])
        return images.reshape(-1, 3, 32, 32), labels

    train = batches(*(f"data_batch_{number}" for number in range(1, 6)))
    return RawData(*train, *batches("test_batch"))


@SOURCES.register("sklearn_digits")
def read_digits(cfg: DatasetConfig, files: RawFiles) -> RawData:
    """scikit-learn's bundled UCI handwritten digits: 1,797 real 8x8 images.

    The file is the one `sklearn.datasets.load_digits` reads (one CSV row per image: 64 grey
    levels 0-16, then the label). Each digit is framed like MNIST's: the 8x8 image is upscaled
    bilinearly into the central 20/28 of the frame, grey levels mapped to 0-255.
    """
    import numpy as np

    rows = np.loadtxt(files["digits.csv.gz"], delimiter=",", dtype=np.int64)
    images, labels = rows[:, :-1].reshape(-1, 1, 8, 8) * (255 / 16), rows[:, -1]
    box = (round(cfg.height * 20 / 28), round(cfg.width * 20 / 28))
    digits = bilinear(8, box[0]) @ images @ bilinear(8, box[1]).T
    top, left = (cfg.height - box[0]) // 2, (cfg.width - box[1]) // 2
    bottom, right = cfg.height - box[0] - top, cfg.width - box[1] - left
    framed = np.pad(digits, ((0, 0), (0, 0), (top, bottom), (left, right)))
    framed = framed.round().clip(0, 255).astype(np.uint8)
    shape = (len(framed), cfg.channels, cfg.height, cfg.width)
    return RawData(np.ascontiguousarray(np.broadcast_to(framed, shape)), labels, None, None)


def bilinear(size: int, new_size: int) -> np.ndarray:
    """The `new_size x size` matrix that resamples a line of pixels linearly, pixel centres
    aligned as torch's `interpolate(mode="bilinear", align_corners=False)` aligns them."""
    import numpy as np

    centres = np.maximum((np.arange(new_size) + 0.5) * (size / new_size) - 0.5, 0)
    left = np.floor(centres).astype(np.int64)
    right = np.minimum(left + 1, size - 1)
    weight = centres - left
    rows, matrix = np.arange(new_size), np.zeros((new_size, size))
    matrix[rows, left] += 1 - weight
    matrix[rows, right] += weight  # at the last pixel `right` is `left`: the weights add to 1
    return matrix
