"""Any input size: multi-size training for GAP and SPP heads (one size for fc), the smallest
input a network takes reported rather than crashed on, and the per-dataset figure that
`dvc plots show` draws from the evaluate stages' data."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from torch import nn

from pipeline.data.store import load_split, read_meta
from pipeline.errors import ConfigError
from pipeline.evaluation.evaluate import evaluate, write_reports
from pipeline.models import ImageClassifier
from pipeline.training.module import Classifier
from tests.conftest import REPO, run_training, train_config

ONE_EPOCH = ("trainer.max_epochs=1", "evaluation.scales=[1.0]", "mlflow.log_checkpoint=false")


class TrainingInputSizes(L.Callback):
    """Records the input heights the network sees in training steps (not validation)."""

    def __init__(self) -> None:
        self.heights: set[int] = set()

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        def record(network: nn.Module, args: tuple) -> None:
            if network.training:
                self.heights.add(args[0].shape[-2])

        module.model.network.register_forward_pre_hook(record)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "several"), [("lenet5_gap", True), ("lenet5", False)])
def test_gap_trains_over_the_size_range_and_fc_at_its_one_size(
    tmp_path, data_dir, model: str, several: bool
):
    seen = TrainingInputSizes()
    run_training(tmp_path, data_dir, f"model={model}", *ONE_EPOCH, extra_callbacks=[seen])
    if several:  # 18 steps, each at one height drawn from 18..56 (0.65x to 2x of 28 px)
        assert len(seen.heights) >= 5 and seen.heights <= set(range(18, 57)), seen.heights
    else:
        assert seen.heights == {28}


def module_for(model: str, data_dir: Path, *overrides: str) -> ImageClassifier:
    """The untrained classifier a training of `model` starts from."""
    cfg = train_config(f"model={model}", f"paths.data_dir={data_dir}", *overrides)
    return Classifier.from_config(cfg, read_meta(data_dir / "processed" / "digits")).model


def test_a_size_range_below_what_the_network_takes_fails_naming_the_key(data_dir):
    # 0.25 x 28 = 7 px; LeNet-5 with a GAP head takes 12 px up
    with pytest.raises(ConfigError, match=r"data\.augment\.scale_range.*12 px"):
        module_for("lenet5_gap", data_dir, "data.augment.scale_range=[0.25,1]")
    module_for("lenet5", data_dir, "data.augment.scale_range=[0.25,1]")  # fc: one size anyway


@pytest.mark.parametrize(
    ("model", "smallest", "tested"), [("lenet5_spp", 12, [28]), ("lenet5", 28, [7, 28])]
)
def test_the_smallest_input_a_network_takes_is_reported_not_crashed_on(
    data_dir, tmp_path, caplog, model: str, smallest: int, tested: list[int]
):
    module = module_for(model, data_dir)
    test = load_split(data_dir / "processed" / "digits", "test")
    with caplog.at_level(logging.WARNING):
        evaluation = evaluate(module, test, [0.25, 1.0], batch_size=1000)
    assert evaluation.min_input_size == smallest
    assert [row["size"] for row in evaluation.resolution] == tested
    if model == "lenet5_spp":
        assert "lenet5-spp takes inputs from 12 px: not tested at [7]" in caplog.text
    write_reports(evaluation, module, test, tmp_path, model)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["min_input_size"] == smallest
    assert metrics["fixed_size"] is (model == "lenet5")


def test_every_run_is_drawn_in_its_datasets_resolution_figure():
    runs = yaml.safe_load((REPO / "params.yaml").read_text())["runs"]
    plots = {
        name: plot["y"]
        for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
        for name, plot in entry.items()
    }
    for run, settings in runs.items():
        files = plots[f"{settings['dataset']}-resolution"]
        assert files.get(f"reports/{run}/resolution.csv") == "accuracy", run
    assert sum(len(files) for files in plots.values()) == len(runs)


@pytest.mark.slow
def test_dvc_plots_show_overlays_the_digits_runs(data_dir, tmp_path):
    """The evaluate stage's resolution.csv of each digits run (untrained networks: the data,
    not the accuracy, is under test), rendered by `dvc plots show` from dvc.yaml."""
    test = load_split(data_dir / "processed" / "digits", "test")
    runs = {
        name: settings
        for name, settings in yaml.safe_load((REPO / "params.yaml").read_text())["runs"].items()
        if settings["dataset"] == "digits"
    }
    for name, settings in runs.items():
        module = module_for(settings["model"], data_dir)
        evaluation = evaluate(module, test, [0.5, 1, 2], 1000)
        write_reports(evaluation, module, test, tmp_path / "reports" / name, name)
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    shown = subprocess.run(
        [dvc, "plots", "show", "--json", "digits-resolution"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    output = json.loads(shown.stdout)
    assert "errors" not in output, output["errors"]
    [plot] = output["data"]["digits-resolution"]
    values = plot["content"]["data"]["values"]
    drawn = {row["filename"] for row in values}  # one line each, named without the common prefix
    assert drawn == {f"{name}/resolution.csv" for name in runs}
    # each curve under its training's name, the run's key
    assert {(row["model"], int(row["size"])) for row in values} >= {
        ("digits-lenet5", 14),
        ("digits-lenet5_gap", 56),
        ("digits-lenet5_spp", 28),
        ("digits-lenet5_classic", 56),
    }
