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


def _one_of(value: object, key: str, allowed: tuple[object, ...]) -> None:
    require(value in allowed, key, value, ", ".join(map(str, allowed)))


# pipeline.profiler.PROFILERS builds them; named here so validating needs no Lightning import
PROFILER_NAMES = ("simple", "advanced", "pytorch")


@dataclass
class TrainerConfig:
    """Where and how Lightning runs: `trainer=cpu|gpu|ddp`, then any key, e.g. devices=4."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    # bit-exact repeats on CPU (same config and seed -> same metrics); costs speed on GPU
    deterministic: bool = True
    max_epochs: int = 10
    # early stopping on val/acc after this many epochs without improvement; null: off
    early_stopping_patience: int | None = None
    log_every_n_steps: int = 50
    # Lightning's per-hook timings, written to fit-profile.txt in the output directory:
    # simple, advanced or pytorch; null: none
    profiler: str | None = None

    def __post_init__(self) -> None:
        _one_of(self.profiler, "trainer.profiler", (None, *PROFILER_NAMES))
        _one_of(self.accelerator, "trainer.accelerator", ("cpu", "gpu", "cuda", "mps", "auto"))
        _one_of(self.strategy, "trainer.strategy", ("auto", "ddp", "ddp_spawn"))
        _one_of(
            self.precision,
            "trainer.precision",
            ("32-true", "16-mixed", "bf16-mixed", "64-true"),
        )
        require(self.devices >= 1, "trainer.devices", self.devices, "an integer >= 1")
        require(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "an integer >= 1")
        require(self.max_epochs >= 1, "trainer.max_epochs", self.max_epochs, "an integer >= 1")
        if self.early_stopping_patience is not None:
            require(
                self.early_stopping_patience >= 1,
                "trainer.early_stopping_patience",
                self.early_stopping_patience,
                "null or an integer >= 1",
            )


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw

    def __post_init__(self) -> None:
        _one_of(self.name, "optimizer.name", ("sgd", "adam", "adamw"))
        require(0 < self.lr <= 10, "optimizer.lr", self.lr, "0 < lr <= 10")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "0 <= m < 1")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            self.betas,
            "two values in [0, 1)",
        )


@dataclass
class SchedulerConfig:
    name: str = "none"
    step_size: int = 10  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    warmup_fraction: float = 0.25  # onecycle: share of steps spent rising to optimizer.lr

    def __post_init__(self) -> None:
        _one_of(self.name, "scheduler.name", ("none", "step", "cosine", "onecycle"))
        require(self.step_size >= 1, "scheduler.step_size", self.step_size, ">= 1")
        require(0 < self.gamma <= 1, "scheduler.gamma", self.gamma, "0 < gamma <= 1")
        require(
            0 < self.warmup_fraction < 1,
            "scheduler.warmup_fraction",
            self.warmup_fraction,
            "0 < fraction < 1",
        )


@dataclass
class AugmentConfig:
    """Training-batch augmentation on the device (seed 003: flips, shifts of up to 2 px)."""

    flip: bool = False
    max_shift: int = 0
    # multi-size training (SPP): one of these sizes per step; empty: the dataset's size
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(0 <= self.max_shift <= 8, "data.augment.max_shift", self.max_shift, "0 to 8")
        require(
            all(size >= 8 for size in self.sizes),
            "data.augment.sizes",
            self.sizes,
            "a list of sizes >= 8 (empty: off)",
        )


@dataclass
class DataConfig:
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size"):
            value = getattr(self, key)
            require(value >= 1, f"data.{key}", value, "an integer >= 1")


@dataclass
class TrackingConfig:
    # default: sqlite:///mlruns/mlflow.db, or the MLFLOW_TRACKING_URI environment variable
    tracking_uri: str = MISSING
    experiment: str = MISSING
    log_checkpoint: bool = True  # the best checkpoint as a run artifact
