"""Raw-data sources: how each dataset's files are obtained and read back as uint8 arrays.

Downloading, checksums and archive handling are torchvision's: a source only points a
torchvision dataset class at one mirror with the md5s from the config, then reads the
decoded arrays it exposes (no per-sample PIL work). `checksum_mismatches` is the check of a
source's files against the config's md5s that the fetch stage makes after downloading and the
preprocess stage before reading. numpy and torchvision are imported where they are used: the
offline digits need no torchvision (nor torch) at all, and their fetch stage not even numpy.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import shutil
import urllib.request
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.config import SOURCE_NAMES, DatasetConfig
from pipeline.errors import ConfigError
from pipeline.registry import Registry

if TYPE_CHECKING:
    import numpy as np


class RawData(NamedTuple):
    train_images: np.ndarray  # uint8 N x C x H x W
    train_labels: np.ndarray  # int64 N
    test_images: np.ndarray | None  # None: the source has no official test split
    test_labels: np.ndarray | None


class RawSource(ABC):
    """Obtains one dataset's raw files into a directory and reads them back."""

    offline: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def download(self, cfg: DatasetConfig, mirror: str, root: Path) -> None:
        """Put the raw files under `root` (from `mirror` unless the source is offline)."""

    @abstractmethod
    def load(self, cfg: DatasetConfig, root: Path) -> RawData:
        """Read the files written by `download` as arrays."""


SOURCES: Registry[RawSource] = Registry("data source", SOURCE_NAMES)


def register_source(*names: str):
    """Class decorator: one source of this class per name (`dataset.source=name`)."""

    def decorate(cls: type[RawSource]) -> type[RawSource]:
        for name in names:
            SOURCES.add(name, cls(name))
        return cls

    return decorate


def _md5(cfg: DatasetConfig, filename: str) -> str:
    try:
        return cfg.checksums[filename]
    except KeyError:
        raise ConfigError(
            f"dataset '{cfg.name}' needs an md5 for '{filename}' under dataset.checksums "
            f"(conf/dataset/{cfg.name}.yaml); it has: {sorted(cfg.checksums)}"
        ) from None


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


def describe_mismatch(name: str, actual: str | None, checksums: dict[str, str]) -> str:
    """One entry of `checksum_mismatches`, in words."""
    if actual is None:
        return f"{name} is missing"
    return f"{name} has md5 {actual}, expected {checksums[name]}"


class SizedFileHandler(urllib.request.FileHandler):
    """`file://` responses with the `length` of an HTTP response, which torchvision's downloader
    reads: without it a `file://` mirror (the config allows them) fails with an AttributeError."""

    def file_open(self, req: urllib.request.Request) -> Any:
        response = super().file_open(req)
        response.length = int(response.headers["Content-length"])
        return response


class TorchvisionSource(RawSource):
    """A torchvision dataset class (named as the source is), re-pointed at one mirror and
    the configured md5s."""

    @cached_property
    def base(self) -> type:
        # Imported on first use: torchvision takes seconds to import, digits never needs it.
        return getattr(importlib.import_module("torchvision.datasets"), self.name)

    @abstractmethod
    def _overrides(self, cfg: DatasetConfig, mirror: str) -> dict[str, Any]:
        """Class attributes that replace torchvision's URLs and checksums."""

    @abstractmethod
    def _arrays(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 N x C x H x W images, int64 labels) of a loaded torchvision dataset."""

    def _configured(self, cfg: DatasetConfig, mirror: str = "") -> type:
        # Same class name as the base: torchvision derives its folder names from it.
        return type(self.base.__name__, (self.base,), self._overrides(cfg, mirror))

    def download(self, cfg: DatasetConfig, mirror: str, root: Path) -> None:
        if mirror.startswith("file://"):  # torchvision downloads with urllib's global opener
            urllib.request.install_opener(urllib.request.build_opener(SizedFileHandler))
        self._configured(cfg, mirror)(str(root), train=True, download=True)

    def load(self, cfg: DatasetConfig, root: Path) -> RawData:
        cls = self._configured(cfg)
        train = self._arrays(cls(str(root), train=True))
        test = self._arrays(cls(str(root), train=False))
        return RawData(*train, *test)


@register_source("MNIST", "FashionMNIST")
class IdxSource(TorchvisionSource):
    """MNIST-format datasets: four gzipped IDX files."""

    def _overrides(self, cfg: DatasetConfig, mirror: str) -> dict[str, Any]:
        resources = [(name, _md5(cfg, name)) for name, _ in self.base.resources]
        return {"mirrors": [mirror], "resources": resources}

    def _arrays(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        return dataset.data.unsqueeze(1).numpy(), dataset.targets.long().numpy()


@register_source("CIFAR10")
class CifarSource(TorchvisionSource):
    """CIFAR-format datasets: one tar.gz of pickled batches, each batch md5-checked."""

    def _overrides(self, cfg: DatasetConfig, mirror: str) -> dict[str, Any]:
        base = self.base
        return {
            "url": f"{mirror}{base.filename}",
            "tgz_md5": _md5(cfg, base.filename),
            "train_list": [[name, _md5(cfg, name)] for name, _ in base.train_list],
            "test_list": [[name, _md5(cfg, name)] for name, _ in base.test_list],
            "meta": {**base.meta, "md5": _md5(cfg, base.meta["filename"])},
        }

    def _arrays(self, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        images = np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))
        return images, np.asarray(dataset.targets, dtype=np.int64)


@register_source("sklearn_digits")
class DigitsSource(RawSource):
    """scikit-learn's bundled UCI handwritten digits: 1,797 real 8x8 images, no network.

    `download` copies the bundled file that `sklearn.datasets.load_digits` reads (one CSV row
    per image: 64 grey levels 0-16, then the label) verbatim, found among the installed
    distribution's files rather than by importing scikit-learn (which takes as long as torch
    does), so the md5 in the config pins the exact data. `load` frames each digit like MNIST
    does: the 8x8 image is upscaled bilinearly into the central 20/28 of the frame, grey levels
    mapped to 0-255.
    """

    offline = True
    file = "digits.csv.gz"

    def download(self, cfg: DatasetConfig, mirror: str, root: Path) -> None:
        bundled = [f for f in importlib.metadata.files("scikit-learn") or [] if f.name == self.file]
        if not bundled:
            raise FileNotFoundError(f"the installed scikit-learn has no {self.file}")
        shutil.copyfile(bundled[0].locate(), root / self.file)

    def load(self, cfg: DatasetConfig, root: Path) -> RawData:
        import numpy as np

        rows = np.loadtxt(root / self.file, delimiter=",", dtype=np.int64)
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
