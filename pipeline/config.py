"""Typed schemas for the composed Hydra config.

Hydra composes YAML; `validate` merges the result into these dataclasses so that a misspelt
key, a wrong type or an out-of-range value stops the run before any data moves, with a
message that names the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

T = TypeVar("T")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `key`, the bad `value` and what is `allowed`."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid; allowed: {allowed}")


class Source(StrEnum):
    """Where a dataset's raw files come from (a torchvision class, or scikit-learn's bundle)."""

    MNIST = "MNIST"
    FashionMNIST = "FashionMNIST"
    CIFAR10 = "CIFAR10"
    sklearn_digits = "sklearn_digits"


@dataclass
class DatasetConfig:
    name: str = MISSING
    source: Source = MISSING
    mirrors: list[str] = field(default_factory=list)
    # file name -> md5 of every file the source downloads or extracts
    checksums: dict[str, str] = field(default_factory=dict)
    channels: int = MISSING
    height: int = MISSING
    width: int = MISSING
    classes: list[str] = MISSING
    val_size: int = MISSING
    # None: the source's official test split; otherwise drawn from the pool like val
    test_size: int | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        require(self.channels in (1, 3), "dataset.channels", self.channels, "1 or 3")
        for key in ("height", "width"):
            value = getattr(self, key)
            require(value >= 8, f"dataset.{key}", value, "an integer >= 8")
        require(len(self.classes) >= 2, "dataset.classes", self.classes, "at least two names")
        require(self.val_size >= 0, "dataset.val_size", self.val_size, "an integer >= 0")
        if self.test_size is not None:
            require(self.test_size > 0, "dataset.test_size", self.test_size, "null or > 0")
        for mirror in self.mirrors:
            require(
                mirror.startswith(("http://", "https://", "file://")) and mirror.endswith("/"),
                "dataset.mirrors",
                mirror,
                "base URLs that start with http(s):// and end with '/'",
            )
        for name, md5 in self.checksums.items():
            require(
                len(md5) == 32 and all(c in "0123456789abcdef" for c in md5),
                f"dataset.checksums.{name}",
                md5,
                "a 32-digit lower-case hex md5",
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class PathsConfig:
    data_dir: str = "data"

    def raw_dir(self, dataset: str) -> Path:
        """Where the fetch stage leaves a dataset's files exactly as its mirrors serve them."""
        return Path(self.data_dir) / "raw" / dataset

    def processed_dir(self, dataset: str) -> Path:
        """Where the preprocess stage writes the split tensors and their meta.json."""
        return Path(self.data_dir) / "processed" / dataset


@dataclass
class DataStageConfig:
    """Config of the fetch and preprocess stages (`conf/data.yaml`)."""

    dataset: DatasetConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    # seconds a connection may stall before the mirror counts as unreachable
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        require(0 < self.timeout_s <= 60, "timeout_s", self.timeout_s, "0 < seconds <= 60")


def validate(cfg: DictConfig, schema: type[T]) -> T:
    """Merge a composed config into `schema` and build it, or raise a ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {err}") from err
