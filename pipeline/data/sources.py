"""Raw-data sources: how each dataset's files are obtained and read back as uint8 tensors.

Downloading, checksums and archive handling are torchvision's: a source only points a
torchvision dataset class at one mirror with the md5s from the config, then reads the
decoded arrays it exposes (no per-sample PIL work). torch, numpy and torchvision are imported
where they are used: the fetch stage of the offline digits needs none of them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.config import SOURCE_NAMES, DatasetConfig
from pipeline.errors import ConfigError
from pipeline.registry import Registry

if TYPE_CHECKING:
    import torch


class RawData(NamedTuple):
    train_images: torch.Tensor  # uint8 N x C x H x W
    train_labels: torch.Tensor  # int64 N
    test_images: torch.Tensor | None  # None: the source has no official test split
    test_labels: torch.Tensor | None


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
        """Read the files written by `download` as tensors."""


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
    def _tensors(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 N x C x H x W images, int64 labels) of a loaded torchvision dataset."""

    def _configured(self, cfg: DatasetConfig, mirror: str = "") -> type:
        # Same class name as the base: torchvision derives its folder names from it.
        return type(self.base.__name__, (self.base,), self._overrides(cfg, mirror))

    def download(self, cfg: DatasetConfig, mirror: str, root: Path) -> None:
        self._configured(cfg, mirror)(str(root), train=True, download=True)

    def load(self, cfg: DatasetConfig, root: Path) -> RawData:
        cls = self._configured(cfg)
        train = self._tensors(cls(str(root), train=True))
        test = self._tensors(cls(str(root), train=False))
        return RawData(*train, *test)


@register_source("MNIST", "FashionMNIST")
class IdxSource(TorchvisionSource):
    """MNIST-format datasets: four gzipped IDX files."""

    def _overrides(self, cfg: DatasetConfig, mirror: str) -> dict[str, Any]:
        resources = [(name, _md5(cfg, name)) for name, _ in self.base.resources]
        return {"mirrors": [mirror], "resources": resources}

    def _tensors(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()


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

    def _tensors(self, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(dataset.targets, dtype=torch.long)


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
        import torch
        import torch.nn.functional as F

        rows = torch.from_numpy(np.loadtxt(root / self.file, delimiter=",", dtype=np.int64))
        images, labels = rows[:, :-1].view(-1, 1, 8, 8).float(), rows[:, -1]
        box = (round(cfg.height * 20 / 28), round(cfg.width * 20 / 28))
        digits = F.interpolate(images * (255 / 16), size=box, mode="bilinear", align_corners=False)
        top, left = (cfg.height - box[0]) // 2, (cfg.width - box[1]) // 2
        bottom, right = cfg.height - box[0] - top, cfg.width - box[1] - left
        framed = F.pad(digits, (left, right, top, bottom))
        framed = framed.round().clamp(0, 255).to(torch.uint8).expand(-1, cfg.channels, -1, -1)
        return RawData(framed.contiguous(), labels.contiguous(), None, None)
