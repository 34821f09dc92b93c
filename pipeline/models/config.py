"""The `model` config group's schema: which backbone, which head, and the seeds' options.

A network is a backbone (feature extractor) times a head (classifier), so
`model.backbone=lenet5,alexnet model.head=fc,gap,spp` is one Hydra sweep. Options left at
null take the backbone's own value (LeNet-5: relu and max pooling, LeCun 1998: scaled tanh and
trainable subsampling, AlexNet: dropout 0.5...), so a sweep over backbones stays faithful to
each paper. The input shape and class count are not model keys: they come from the dataset.

The dataclass is stored as `model/schema`, which every `conf/model/*.yaml` extends, so each key
exists (and is type-checked) when Hydra composes: `model.first_layer=gabor` just works.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.config import require

BACKBONE_NAMES = ("lenet5", "lenet5_keras", "lenet5_classic", "alexnet")
HEAD_NAMES = ("fc", "gap", "spp")
ACTIVATIONS = ("relu", "tanh", "scaled_tanh", "sigmoid")
# trainable: LeCun's subsampling, the 2x2 sum times a coefficient plus a bias, per map
POOLINGS = ("max", "avg", "trainable")
# seed 000: the value outside the image is "a = 0 or x_0"
PADDING_MODES = ("zeros", "replicate")
# learned from data, or fixed to a classical bank (seeds 000, 001, 003)
FIRST_LAYERS = ("learned", "gabor", "prewitt", "sobel", "gaussian", "laplacian")
OUTPUTS = ("linear", "rbf")
STEMS = ("imagenet", "cifar")


def _one_of(value: object, key: str, allowed: tuple[str, ...], nullable: bool = False) -> None:
    ok = value in allowed or (nullable and value is None)
    require(ok, key, value, ("null, " if nullable else "") + ", ".join(allowed))


@dataclass
class ModelConfig:
    backbone: str = MISSING
    head: str = "fc"
    # null: the backbone's own (relu; lenet5_classic: scaled_tanh)
    activation: str | None = None
    # null: the backbone's own (lenet5, alexnet: max; lenet5_keras: avg; lenet5_classic: trainable)
    pooling: str | None = None
    padding_mode: str = "zeros"
    first_layer: str = "learned"
    # linear scores, or LeCun's RBF: minus the squared distance to fixed +-1 class codes
    output: str = "linear"
    # pixels added on every side of the input; null: enough to bring the dataset's images to
    # the backbone's design field (LeNet-5: 32, so MNIST's 28x28 gets 2; CIFAR's 32x32 gets 0)
    input_pad: int | None = None
    # widths of the hidden fully connected layers of the fc and spp heads; null: the backbone's
    # (LeNet-5: [84] = F6; AlexNet: [4096, 4096] times the width multiplier)
    hidden: list[int] | None = None
    # spp head: pyramid levels (n means n x n bins); null: LeNet [4, 2, 1], AlexNet [6, 3, 2, 1]
    spp_levels: list[int] | None = None
    # dropout before each hidden layer; null: the backbone's (LeNet-5: 0, AlexNet: 0.5)
    dropout: float | None = None
    # alexnet only: imagenet (11x11 stride 4) or cifar (5x5 stride 1) first layer; null:
    # imagenet for inputs of 64 px and more, cifar below
    stem: str | None = None
    # alexnet only: multiplies every layer's width; null: 1.0
    width: float | None = None

    def __post_init__(self) -> None:
        _one_of(self.backbone, "model.backbone", BACKBONE_NAMES)
        _one_of(self.head, "model.head", HEAD_NAMES)
        _one_of(self.activation, "model.activation", ACTIVATIONS, nullable=True)
        _one_of(self.pooling, "model.pooling", POOLINGS, nullable=True)
        _one_of(self.padding_mode, "model.padding_mode", PADDING_MODES)
        _one_of(self.first_layer, "model.first_layer", FIRST_LAYERS)
        _one_of(self.output, "model.output", OUTPUTS)
        _one_of(self.stem, "model.stem", STEMS, nullable=True)
        require(
            self.output == "linear" or self.head != "gap",
            "model.output",
            self.output,
            "linear with head=gap (its class maps are the scores; rbf needs an fc or spp head)",
        )
        if self.input_pad is not None:
            require(self.input_pad >= 0, "model.input_pad", self.input_pad, "null or >= 0")
        if self.hidden is not None:
            ok = all(width > 0 for width in self.hidden)
            require(ok, "model.hidden", self.hidden, "null or a list of widths > 0")
        if self.spp_levels is not None:
            ok = len(self.spp_levels) > 0 and all(level > 0 for level in self.spp_levels)
            require(ok, "model.spp_levels", self.spp_levels, "null or a non-empty list of ints > 0")
        if self.dropout is not None:
            require(0 <= self.dropout < 1, "model.dropout", self.dropout, "null or 0 <= p < 1")
        if self.width is not None:
            require(0 < self.width <= 4, "model.width", self.width, "null or 0 < width <= 4")


ConfigStore.instance().store(group="model", name="schema", node=ModelConfig)
