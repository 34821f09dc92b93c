"""The model zoo: every figure of the seeds, every backbone x head, resolution and config rules."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cli import CONF_DIR, compose_config
from pipeline.config import FIRST_LAYERS, ModelConfig, SummaryJob
from pipeline.errors import ConfigError
from pipeline.models import BACKBONES, HEADS, InputShapeError, Network, build_model
from pipeline.models.banks import bank
from pipeline.models.geometry import output_shape
from pipeline.models.layers import (
    RBFOutput,
    ScaledTanh,
    SpatialPyramidPool,
    TrainableSubsampling,
    hadamard_codes,
)
from pipeline.models.zoo.lenet import LECUN_C3_TABLE
from tests.conftest import CIFAR, MNIST, dataset_config

BANKS = [name for name in FIRST_LAYERS if name != "learned"]


def build(
    backbone: str,
    head: str = "fc",
    shape: tuple[int, int, int] = MNIST,
    classes: int = 10,
    **options,
) -> Network:
    return build_model(
        ModelConfig(backbone=backbone, head=head, **options), dataset_config(shape, classes)
    )


@functools.cache
def shared(backbone: str, head: str, shape: tuple[int, int, int] = MNIST) -> Network:
    """One build per combination for the forward-only tests (AlexNet takes a while to init)."""
    return build(backbone, head, shape).eval()


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_params(model: Network) -> dict[str, int]:
    """Trainable parameters of each named layer that has any."""
    return {name: n for name, block in model.layers() if (n := trainable(block))}


BACKBONE_NAMES, HEAD_NAMES = tuple(BACKBONES), tuple(HEADS)


def composed(*overrides: str) -> SummaryJob:
    return compose_config("summary", SummaryJob, overrides)


# --- the seeds' figures -------------------------------------------------------------------


def test_lenet5_has_seed_000s_parameters_per_layer() -> None:
    model = build("lenet5")
    assert layer_params(model) == {"C1": 156, "C3": 2416, "C5": 48120, "F6": 10164, "output": 850}
    assert trainable(model) == 61_706


def test_lenet5_pads_mnist_to_its_32x32_field_inside_the_network() -> None:
    model = build("lenet5")
    assert model.expected_input == (1, 28, 28)
    assert model.hparams["input_pad"] == 2
    assert output_shape(model.backbone.pad, MNIST) == (1, 32, 32)
    assert build("lenet5", shape=CIFAR).hparams["input_pad"] == 0  # already 32x32


def test_lenet5_keras_has_seed_001s_257546_parameters() -> None:
    model = build("lenet5_keras")
    expected = {"C1": 156, "C3": 2416, "C5": 2040, "F6": 252_084, "output": 850}
    assert layer_params(model) == expected
    assert trainable(model) == 257_546


@pytest.mark.parametrize("output", ["rbf", "linear"])
def test_lenet5_classic_has_60000_trainable_parameters_up_to_f6(output: str) -> None:
    model = build("lenet5_classic", output=output)
    per_layer = layer_params(model)
    up_to_f6 = {"C1": 156, "S2": 12, "C3": 1516, "S4": 32, "C5": 48_120, "F6": 10_164}
    assert {name: per_layer[name] for name in up_to_f6} == up_to_f6
    assert sum(up_to_f6.values()) == 60_000
    # the RBF's class codes are fixed (a buffer), the linear output adds 84 x 10 + 10
    assert trainable(model) == (60_000 if output == "rbf" else 60_850)


def test_lenet5_classic_uses_scaled_tanh_and_trainable_subsampling() -> None:
    blocks = dict(build("lenet5_classic").layers())
    assert isinstance(blocks["C1"][1], ScaledTanh)
    assert isinstance(blocks["S2"][0], TrainableSubsampling)
    assert isinstance(blocks["S4"][1], ScaledTanh)
    assert isinstance(blocks["output"], nn.Linear)  # ModelConfig's default output
    assert isinstance(dict(build("lenet5_classic", output="rbf").layers())["output"], RBFOutput)


def test_alexnet_has_60965224_parameters_at_224_with_1000_classes() -> None:
    model = build("alexnet", shape=(3, 224, 224), classes=1000)  # counted without a forward
    assert model.hparams["stem"] == "imagenet"
    assert layer_params(model) == {
        "conv1": 34_944,
        "conv2": 307_456,  # groups=2: each kernel sees the 48 maps on its own GPU
        "conv3": 885_120,
        "conv4": 663_936,
        "conv5": 442_624,
        "fc6": 37_752_832,
        "fc7": 16_781_312,
        "output": 4_097_000,
    }
    assert trainable(model) == 60_965_224
    assert output_shape(model.backbone, (3, 224, 224)) == (256, 6, 6)
    assert output_shape(model.backbone.conv1, (3, 224, 224)) == (96, 55, 55)


@pytest.mark.slow
def test_alexnet_runs_at_224_on_a_real_device() -> None:
    model = build("alexnet", shape=(3, 224, 224), classes=1000).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_alexnet_layers_follow_the_paper() -> None:
    blocks = dict(shared("alexnet", "fc", CIFAR).layers())
    assert [m.groups for m in (blocks[f"conv{i}"][0] for i in range(1, 6))] == [1, 2, 1, 2, 2]
    norm = blocks["norm1"]
    assert isinstance(norm, nn.LocalResponseNorm)
    assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, 1e-4, 0.75, 2)
    assert (blocks["pool1"].kernel_size, blocks["pool1"].stride) == (3, 2)  # overlapping
    assert [m.p for m in blocks["fc6"].modules() if isinstance(m, nn.Dropout)] == [0.5]


def test_alexnet_cifar_stem_and_width_multiplier() -> None:
    model = shared("alexnet", "fc", CIFAR)
    conv1 = model.first_conv()
    assert model.hparams["stem"] == "cifar"
    assert (conv1.kernel_size, conv1.stride, conv1.out_channels) == ((5, 5), (1, 1), 96)
    half = build("alexnet", "gap", CIFAR, width=0.5)
    widths = [m.out_channels for m in half.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [48, 128, 192, 192, 128]
    assert half(torch.randn(1, *CIFAR)).shape == (1, 10)


# --- LeNet-5's C3 connection table --------------------------------------------------------

# LeCun et al. 1998, Table I: "Each column indicates which feature map in S2 are combined by
# the units in a particular feature map of C3." Rows: S2 maps 0-5; columns: C3 maps 0-15.
#           C3:  0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
PAPER_TABLE_I = [
    "X . . . X X X . . X X  X  X  .  X  X",  # S2 map 0
    "X X . . . X X X . . X  X  X  X  .  X",  # S2 map 1
    "X X X . . . X X X . .  X  .  X  X  X",  # S2 map 2
    ". X X X . . X X X X .  .  X  .  X  X",  # S2 map 3
    ". . X X X . . X X X X  .  X  X  .  X",  # S2 map 4
    ". . . X X X . . X X X  X  .  X  X  X",  # S2 map 5
]


def paper_table() -> list[set[int]]:
    """For each S2 map, the C3 maps it feeds."""
    return [{j for j, mark in enumerate(row.split()) if mark == "X"} for row in PAPER_TABLE_I]


def test_c3_table_in_the_code_is_the_papers() -> None:
    in_code = [{j for j, mark in enumerate(row) if mark == "X"} for row in LECUN_C3_TABLE]
    assert in_code == paper_table()
    assert sum(map(len, paper_table())) == 60


def test_c3_layer_is_wired_by_the_table() -> None:
    """Feed one S2 map at a time: exactly the C3 maps its table row marks respond."""
    c3 = build("lenet5_classic").backbone.C3[0]
    assert trainable(c3) == 1516
    silent = c3(torch.zeros(1, 6, 14, 14))
    for i, fed in enumerate(paper_table()):
        x = torch.zeros(1, 6, 14, 14)
        x[0, i] = torch.rand(14, 14) + 0.5
        changed = (c3(x) - silent).abs().amax(dim=(0, 2, 3)) > 0
        assert set(changed.nonzero().flatten().tolist()) == fed, f"S2 map {i}"


# --- every backbone x head ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("head", HEAD_NAMES)
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_every_backbone_with_every_head_gives_batch_x_classes(backbone, head, shape) -> None:
    model = shared(backbone, head, shape)
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert model.expected_input == shape


@pytest.mark.parametrize("head", ["gap", "spp"])
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_gap_and_spp_models_take_any_size_from_their_minimum(backbone, head) -> None:
    model = shared(backbone, head)
    with torch.no_grad():
        for size in (24, 32, 48, 64, model.min_input_size):
            assert model(torch.randn(1, 1, size, size)).shape == (1, 10), size
        assert model(torch.randn(1, 1, 40, 56)).shape == (1, 10)


@pytest.mark.parametrize(
    ("backbone", "shape", "minimum"),
    [
        ("lenet5", MNIST, 12),  # 12 + 2 x 2 pad = 16: C1 12, S2 6, C3 2, S4 1
        ("lenet5_classic", MNIST, 12),
        ("lenet5_keras", MNIST, 12),
        ("lenet5", CIFAR, 16),  # no pad at 32x32
        ("alexnet", CIFAR, 7),  # cifar stem
        ("alexnet", (3, 224, 224), 31),  # imagenet stem: 31 -> conv1 7 -> pool1 3 -> pool2 1
        ("nin", CIFAR, 7),  # 7 -> pool1 3 -> pool2 1
    ],
)
def test_documented_minimum_input_sizes(backbone, shape, minimum) -> None:
    assert build(backbone, "gap", shape).min_input_size == minimum
    assert build(backbone, "spp", shape, hidden=[8]).min_input_size == minimum


def test_fc_model_names_the_size_it_expects() -> None:
    model = shared("lenet5", "fc")
    expected = (
        "lenet5-fc expects 1x28x28 input (its training size), got 1x24x24; "
        "use head=gap or head=spp for other sizes, or resize"
    )
    with pytest.raises(InputShapeError) as caught:
        model(torch.randn(1, 1, 24, 24))
    assert str(caught.value) == expected
    with pytest.raises(InputShapeError, match=r"alexnet-fc expects 3x32x32 input"):
        shared("alexnet", "fc", CIFAR)(torch.randn(1, 3, 64, 64))


def test_gap_and_spp_models_refuse_inputs_below_the_minimum_clearly() -> None:
    with pytest.raises(InputShapeError, match=r"lenet5-gap needs inputs of at least 1x12x12"):
        shared("lenet5", "gap")(torch.randn(1, 1, 11, 11))
    with pytest.raises(
        InputShapeError, match=r"lenet5_keras-spp needs inputs of at least 1x12x12 .*, got 1x9x30"
    ):
        shared("lenet5_keras", "spp")(torch.randn(1, 1, 9, 30))
    with pytest.raises(InputShapeError, match=r"expects 1-channel input, got 3x32x32"):
        shared("lenet5", "spp")(torch.randn(1, 3, 32, 32))


def test_a_dataset_too_small_for_the_imagenet_stem_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"alexnet-fc needs images of at least 63x63.*stem=cifar"):
        build("alexnet", shape=CIFAR, stem="imagenet")


# --- training-relevant behaviour -----------------------------------------------------------


@pytest.mark.parametrize("head", HEAD_NAMES)
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_gradients_reach_every_trainable_parameter(backbone, head) -> None:
    torch.manual_seed(0)
    options = {"output": "rbf"} if backbone == "lenet5_classic" and head != "gap" else {}
    model = build(backbone, head, CIFAR, **options)
    loss = F.cross_entropy(model(torch.randn(4, *CIFAR)), torch.arange(4))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("first_layer", BANKS)
def test_a_classical_first_layer_is_frozen(first_layer: str) -> None:
    model = build("lenet5", first_layer=first_layer)
    conv = model.first_conv()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    F.cross_entropy(model(torch.randn(4, *MNIST)), torch.arange(4)).backward()
    with torch.no_grad():  # a plain SGD step on whatever received a gradient
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert not conv.weight.requires_grad and conv.weight.grad is None
    assert not conv.bias.requires_grad and conv.bias.grad is None
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert torch.equal(conv.weight[:, 0], bank(first_layer, 6, 5))
    assert trainable(model) == 61_706 - 156


def test_a_bank_on_rgb_applies_each_kernel_to_the_channel_mean() -> None:
    conv = build("alexnet", "gap", CIFAR, width=0.25, first_layer="gabor").first_conv()
    for channel in range(3):
        assert torch.equal(conv.weight[:, channel], bank("gabor", 24, 5) / 3)


def test_banks_follow_the_documented_rule() -> None:
    def centre(kernel: torch.Tensor) -> torch.Tensor:
        return kernel[1:4, 1:4] / kernel[1:4, 1:4].abs().max()

    prewitt, sobel = bank("prewitt", 16, 5), bank("sobel", 16, 5)
    # channel 0 is seed 000's Prewitt_horizontal; 6 (270 degrees) its Prewitt_vertical
    assert centre(prewitt[0]).tolist() == [[1, 1, 1], [0, 0, 0], [-1, -1, -1]]
    assert centre(prewitt[6]).tolist() == [[1, 0, -1], [1, 0, -1], [1, 0, -1]]
    assert centre(sobel[6]).tolist() == [[0.5, 0, -0.5], [1, 0, -1], [0.5, 0, -0.5]]
    assert torch.equal(prewitt[:8], prewitt[8:])  # 8 compass directions, cycled
    assert len({tuple(k.flatten().tolist()) for k in prewitt[:8]}) == 8
    for name in BANKS:
        kernels = bank(name, 6, 5)
        assert torch.allclose(kernels.flatten(1).norm(dim=1), torch.ones(6))
        assert len({tuple(k.flatten().tolist()) for k in kernels}) == 6, name  # distinct
        if name != "gaussian":  # edge and Laplacian kernels ignore flat regions
            assert torch.allclose(kernels.sum(dim=(1, 2)), torch.zeros(6), atol=1e-6)


def test_padding_mode_replicate_repeats_the_border() -> None:
    """Seed 000: the value outside the image is "a = 0 or x_0"."""
    constant = torch.full((1, *MNIST), 0.7)
    for mode, uniform in (("replicate", True), ("zeros", False)):
        model = build("lenet5", padding_mode=mode)
        c1 = model.backbone.C1(model.backbone.pad(constant))
        assert (c1.amax(dim=(2, 3)) - c1.amin(dim=(2, 3)) < 1e-5).all().item() is uniform
    conv2 = dict(build("alexnet", "gap", CIFAR, padding_mode="replicate").layers())["conv2"]
    assert conv2[0].padding_mode == "replicate"


@pytest.mark.parametrize(
    ("pooling", "activation", "kinds"),
    [
        ("avg", "tanh", (nn.AvgPool2d, nn.Tanh)),
        ("max", "sigmoid", (nn.MaxPool2d, nn.Sigmoid)),
        ("trainable", "relu", (TrainableSubsampling, nn.ReLU)),
    ],
)
def test_pooling_and_activation_are_options(pooling, activation, kinds) -> None:
    model = build("lenet5", pooling=pooling, activation=activation)
    leaves = {type(m) for m in model.modules()}
    assert set(kinds) <= leaves and model(torch.randn(2, *MNIST)).shape == (2, 10)


def test_scaled_tanh_is_lecuns() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 10.0])
    assert torch.allclose(ScaledTanh()(x), 1.7159 * torch.tanh(2 * x / 3))
    assert abs(ScaledTanh()(torch.tensor(1.0)).item() - 1) < 1e-4  # f(1) = 1, f(-1) = -1


def test_trainable_subsampling_is_a_2x2_sum_times_a_coefficient_plus_a_bias() -> None:
    layer = TrainableSubsampling(2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -1.0]))
        layer.bias.copy_(torch.tensor([0.5, 0.0]))
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    assert layer(x)[0, 0, 0, 0].item() == 2 * (0 + 1 + 4 + 5) + 0.5
    assert layer(x)[0, 1, 1, 1].item() == -1 * (26 + 27 + 30 + 31)


def test_rbf_output_scores_minus_the_squared_distance_to_fixed_codes() -> None:
    rbf = RBFOutput(84, 10)
    codes = hadamard_codes(10, 84)
    assert torch.equal(rbf.codes, codes) and not list(rbf.parameters())
    assert (
        set(codes.unique().tolist()) == {-1.0, 1.0} and len(set(map(tuple, codes.tolist()))) == 10
    )
    scores = rbf(codes)
    assert torch.equal(scores.argmax(dim=1), torch.arange(10))
    assert torch.equal(scores.diagonal(), torch.zeros(10))
    x = torch.randn(3, 84)
    assert torch.allclose(rbf(x), -(torch.cdist(x, codes) ** 2), atol=1e-3)


def test_spp_bins_per_map() -> None:
    assert SpatialPyramidPool([4, 2, 1]).bins == 21
    assert SpatialPyramidPool([6, 3, 2, 1]).bins == 50
    assert SpatialPyramidPool([4, 2, 1])(torch.randn(2, 16, 7, 9)).shape == (2, 16 * 21)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")))
def test_named_configs_compose_and_build(name: str) -> None:
    cfg = composed(f"model={name}", "dataset=digits")
    model = build_model(cfg.model, cfg.dataset)
    backbone, _, head = name.partition("_")
    if head in HEAD_NAMES:  # lenet5_gap, alexnet_spp...
        assert (model.hparams["backbone"], model.hparams["head"]) == (backbone, head)
    else:  # a network's own file: its backbone with its usual head
        assert model.hparams["backbone"] == name
    with torch.no_grad():
        assert model.eval()(torch.randn(1, *MNIST)).shape == (1, 10)


def test_the_required_named_configs_exist() -> None:
    names = {p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")}
    required = {"lenet5", "lenet5_gap", "lenet5_spp", "lenet5_classic", "lenet5_keras"}
    assert required | {"alexnet", "alexnet_gap", "alexnet_spp"} <= names


def test_a_sweep_over_backbones_takes_each_backbones_own_defaults() -> None:
    cfg = composed("model=lenet5", "model.backbone=alexnet", "model.head=spp", "dataset=cifar10")
    hparams = build_model(cfg.model, cfg.dataset).hparams
    assert hparams["spp_levels"] == [6, 3, 2, 1] and hparams["dropout"] == 0.5
    assert hparams["input_pad"] == 0 and hparams["stem"] == "cifar"


def test_hparams_are_plain_values() -> None:
    hparams = build("lenet5_classic", "spp", output="rbf").hparams
    assert json.loads(json.dumps(hparams)) == hparams
    assert hparams["activation"] == "scaled_tanh" and hparams["input_shape"] == [1, 28, 28]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"head": "mlp"}, "'model.head' = 'mlp' is invalid; allowed: fc, gap, spp"),
        ({"activation": "gelu"}, "allowed: null, relu, tanh, scaled_tanh, sigmoid"),
        ({"pooling": "min"}, "allowed: null, max, avg, trainable"),
        ({"first_layer": "canny"}, "learned, gabor, prewitt, sobel, gaussian, laplacian"),
        ({"padding_mode": "reflect"}, "allowed: zeros, replicate"),
        ({"head": "gap", "output": "rbf"}, "'model.output' = 'rbf' is invalid"),
        ({"dropout": 1.0}, "'model.dropout' = 1.0 is invalid"),
        ({"spp_levels": []}, "'model.spp_levels' = [] is invalid"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(options, message) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelConfig(**{"backbone": "lenet5", **options})
    assert message in str(caught.value)


def test_composed_config_errors_are_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"'model.head' = 'foo' is invalid; allowed: fc, gap, spp"
    ):
        cfg = composed("model.head=foo")
        build_model(cfg.model, cfg.dataset)


def test_alexnet_only_options_are_refused_for_lenet() -> None:
    with pytest.raises(ConfigError, match=r"'model.width' = 0.5 is invalid; allowed: null"):
        build("lenet5", width=0.5)
    with pytest.raises(ConfigError, match=r"'model.stem' = 'cifar' is invalid"):
        build("lenet5_keras", stem="cifar")


def test_first_conv_is_the_layer_facing_the_image() -> None:
    assert shared("lenet5_keras", "fc").first_conv().weight.shape == (6, 1, 5, 5)
    assert shared("alexnet", "gap", CIFAR).first_conv().weight.shape == (96, 3, 5, 5)
