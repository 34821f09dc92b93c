"""The architecture report: the output-size formula, the seeds' per-layer figures, the CLI."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from pipeline.cli import compose_config
from pipeline.config import ModelConfig, SummaryJob
from pipeline.errors import ConfigError
from pipeline.models import BACKBONES, HEADS, Network, build_model
from pipeline.models.geometry import conv_output_size
from pipeline.models.summary import LayerRow, describe, format_table, layer_rows
from tests.conftest import MNIST, dataset_config, run_module


@functools.cache
def rows_of(backbone: str, head: str = "fc", **options: str) -> dict[str, LayerRow]:
    model = build_model(ModelConfig(backbone=backbone, head=head, **options), dataset_config())
    return {row.name: row for row in layer_rows(model.layers(), model.expected_input)}


def summary_config(*overrides: str) -> SummaryJob:
    return compose_config("summary", SummaryJob, overrides)


# --- the output-size formula (seed 001) --------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kernel", "padding", "stride", "expected"),
    [
        (7, 3, 0, 1, 5),  # seed 003: 7x7 input, 3x3 filter, stride 1
        (7, 3, 0, 2, 3),  # stride 2
        (7, 3, 1, 1, 7),  # "pad with 1 pixel border => 7x7 output"
        (32, 5, 2, 1, 32),  # seed 003: (32 + 2*2 - 5)/1 + 1 = 32
        (32, 5, 0, 1, 28),  # LeNet-5's C1
        (5, 3, 1, 2, 3),  # seed 001's strided example: 5x5, zero padding, stride 2 -> 3x3
        (224, 11, 2, 4, 55),  # AlexNet's conv1
        (55, 3, 0, 2, 27),  # its overlapping pooling
    ],
)
def test_conv_output_size_is_the_seeds_formula(size, kernel, padding, stride, expected) -> None:
    assert conv_output_size(size, kernel, padding, stride) == expected


def test_seed_001s_512x512_example_through_the_report() -> None:
    """100 filters of 5x5 on a 512x512 RGB image, stride 1, 'same' zero padding."""
    conv = nn.Conv2d(3, 100, 5, padding=2)
    (row,) = layer_rows([("conv", conv)], (3, 512, 512))
    assert row.params == (3 * 5 * 5 + 1) * 100 == 7_600
    assert row.output_shape == (100, 512, 512)
    # 100 x 512 x 512 float32 values = 104,857,600 bytes = 100 MiB per image. The seed's
    # "3 x 512 x 512 x 100 x 32 bits (300 MB)" also multiplies by the 3 input channels, which
    # do not add output values: each of the 100 maps sums over them into one 512x512 map.
    assert row.activation_bytes == 100 * 512 * 512 * 4 == 104_857_600 == 100 * 2**20
    # and the seed's comparison: a fully connected layer of 100 units on the same image (on
    # the meta device: its 78.6 million weights need shapes here, not memory)
    with torch.device("meta"):
        dense = nn.Sequential(nn.Flatten(), nn.Linear(3 * 512 * 512, 100))
    (row,) = layer_rows([("dense", dense)], (3, 512, 512))
    assert row.params == (3 * 512 * 512 + 1) * 100 == 78_643_300


# --- the seeds' networks, layer by layer --------------------------------------------------


def test_lenet5_classic_matches_lecun_1998_layer_by_layer() -> None:
    rows = rows_of("lenet5_classic", output="rbf")
    expected = {  # layer: (output, trainable parameters, connections), seed 003 / the paper
        "C1": ((6, 28, 28), 156, 122_304),
        "S2": ((6, 14, 14), 12, 5_880),
        "C3": ((16, 10, 10), 1_516, 151_600),
        "S4": ((16, 5, 5), 32, 2_000),
        "C5": ((120, 1, 1), 48_120, 48_120),
        "F6": ((84,), 10_164, 10_164),
        "output": ((10,), 0, 84 * 10),  # RBF: fixed codes, each unit sees all of F6
    }
    for name, figures in expected.items():
        row = rows[name]
        assert (row.output_shape, row.params, row.connections) == figures, name
    assert sum(r.params for r in rows.values()) == 60_000
    # LeNet-5's total: the per-layer connections above add up to 340,908
    assert sum(r.connections for r in rows.values()) == 340_908
    assert rows["pad"].output_shape == (1, 32, 32)  # MNIST's 28x28 on the 32x32 field


def test_lenet5_matches_seed_000s_keras_summary() -> None:
    rows = rows_of("lenet5")
    expected = {  # Keras prints (None, H, W, C); these are C, H, W
        "C1": ((6, 28, 28), 156),
        "S2": ((6, 14, 14), 0),
        "C3": ((16, 10, 10), 2_416),
        "S4": ((16, 5, 5), 0),
        "C5": ((120, 1, 1), 48_120),
        "flatten": ((120,), 0),
        "F6": ((84,), 10_164),
        "output": ((10,), 850),
    }
    assert {name: (rows[name].output_shape, rows[name].params) for name in expected} == expected
    assert rows["S2"].connections == 6 * 14 * 14 * 4  # max pooling: a 2x2 window, no bias


def test_lenet5_keras_matches_seed_001s_summary() -> None:
    rows = rows_of("lenet5_keras")
    expected = {
        "C1": ((6, 28, 28), 156),
        "S2": ((6, 14, 14), 0),
        "C3": ((16, 10, 10), 2_416),
        "S4": ((16, 5, 5), 0),
        "C5": ((120, 5, 5), 2_040),
        "flatten": ((3000,), 0),
        "F6": ((84,), 252_084),
        "output": ((10,), 850),
    }
    assert {name: (row.output_shape, row.params) for name, row in rows.items()} == expected
    assert sum(r.params for r in rows.values()) == 257_546


def test_alexnet_at_imagenet_size_through_the_summary_overrides() -> None:
    config = summary_config("model=alexnet", "input=[3,224,224]", "num_classes=1000")
    model = build_model(config.model, config.reported_dataset())
    rows = {r.name: r for r in layer_rows(model.layers(), model.expected_input)}
    shapes = {name: rows[name].output_shape for name in ("conv1", "pool1", "pool2", "pool5")}
    assert shapes == {
        "conv1": (96, 55, 55),
        "pool1": (96, 27, 27),
        "pool2": (256, 13, 13),
        "pool5": (256, 6, 6),
    }
    assert rows["conv2"].connections == 256 * 27 * 27 * (48 * 5 * 5 + 1)  # groups=2
    assert sum(r.params for r in rows.values()) == 60_965_224
    assert "60,965,224" in describe(model)


def test_spp_and_gap_connections_count_their_bins() -> None:
    spp, gap = rows_of("lenet5", "spp"), rows_of("lenet5", "gap")
    # S4 gives 16 maps of 5x5; bins of 4x4 span 2 px (8 per row), 2x2 span 3 (6), 1x1 all 5
    assert spp["spp"].connections == 16 * (8 * 8 + 6 * 6 + 5 * 5) == 2_000
    assert spp["spp"].output_shape == (16 * 21,)
    assert gap["classes"].output_shape == (10, 5, 5)
    assert gap["gap"].connections == 10 * 5 * 5


def test_a_frozen_first_layer_is_reported_as_frozen() -> None:
    c1 = rows_of("lenet5", first_layer="gabor")["C1"]
    assert (c1.params, c1.frozen, c1.connections) == (0, 156, 122_304)


@pytest.mark.parametrize("head", tuple(HEADS))
@pytest.mark.parametrize("backbone", tuple(BACKBONES))
def test_report_shapes_are_the_shapes_a_forward_pass_gives(backbone: str, head: str) -> None:
    model = build_model(ModelConfig(backbone=backbone, head=head), dataset_config())
    sizes = [MNIST] if head == "fc" else [MNIST, (1, 48, 48)]
    for shape in sizes:
        outputs = _block_outputs(model.eval(), shape)
        rows = layer_rows(model.layers(), shape)
        assert [(r.name, r.output_shape) for r in rows] == outputs
        assert rows[-1].activation_bytes == 10 * 4


def _block_outputs(model: Network, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        block.register_forward_hook(lambda m, i, o, name=name: seen.append((name, o.shape[1:])))
        for name, block in model.layers()
    ]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for hook in hooks:
        hook.remove()
    return [(name, tuple(out)) for name, out in seen]


def test_the_table_is_aligned_with_totals() -> None:
    lines = format_table(list(rows_of("lenet5_classic", output="rbf").values())).splitlines()
    header, rule, *body, last_rule, total = lines
    assert header.split()[:6] == ["layer", "type", "output", "params", "frozen", "connections"]
    assert set(rule) == {"-"} and rule == last_rule
    assert total.split()[:2] == ["total", "60,000"] and "340,908" in total
    ends = {len(line) for line in [header, *body, total]}
    assert len(ends) == 1  # right-aligned numbers end in the same column


def test_summary_config_checks_its_overrides() -> None:
    with pytest.raises(ConfigError, match=r"'input' = \[3, 224\] is invalid"):
        summary_config("input=[3,224]")
    with pytest.raises(ConfigError, match=r"'model.head' = 'foo' is invalid; allowed: fc, gap"):
        summary_config("model.head=foo")


@pytest.mark.slow
def test_summary_cli_prints_lecuns_figures() -> None:
    result = run_module("pipeline.summary", "model=lenet5_classic")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert lines["C1"][2:6] == ["6x28x28", "156", "0", "122,304"]
    assert lines["S2"][2:6] == ["6x14x14", "12", "0", "5,880"]
    assert lines["C3"][2:6] == ["16x10x10", "1,516", "0", "151,600"]
    assert lines["S4"][2:6] == ["16x5x5", "32", "0", "2,000"]
    assert lines["C5"][2:6] == ["120x1x1", "48,120", "0", "48,120"]
    assert lines["F6"][2:6] == ["84", "10,164", "0", "10,164"]
    assert lines["total"][1:3] == ["60,000", "0"] and lines["total"][3] == "340,908"
    assert "lenet5_classic-fc: input 1x28x28" in result.stdout


@pytest.mark.slow
def test_summary_cli_rejects_a_bad_head_in_one_line() -> None:
    result = run_module("pipeline.summary", "model=alexnet", "model.head=mlp")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "config key 'model.head' = 'mlp' is invalid; allowed: fc, gap, spp" in output
    assert "Traceback" not in output
