"""A network of the user's own package, named by `_target_`, through the whole pipeline: config,
build with every head, summary (measured on the meta device), training, evaluation at every
size, the logged model and loading it where the user's package is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import compose_config
from pipeline.config import ModelConfig, SummaryJob
from pipeline.errors import ConfigError
from pipeline.models import HEADS, build_model
from pipeline.models.summary import describe, layer_rows
from pipeline.tracking.runs import by_size
from pipeline.tracking.store import read_run
from tests.conftest import MNIST, cli, dataset_config, env

# a stem and one residual block with batch norm: a module with no shape or connection rule,
# whose forward is not its children in order
OWN_PACKAGE = '''
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, width), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(conv_bn(width, width), nn.ReLU(), conv_bn(width, width))
        self.down = nn.Sequential(conv_bn(width, 2 * width, stride=2), nn.ReLU())

    def forward(self, x):
        x = self.stem(x)
        return self.down(nn.functional.relu(x + self.block(x)))


def classifier(in_channels: int):
    """Ends in its own pooling: no feature maps left for a gap or spp head."""
    return nn.Sequential(TinyResNet(in_channels), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''

# a config group file outside conf/, found through hydra.searchpath
OWN_MODEL_YAML = """
backbone:
  _target_: my_nets.TinyResNet
  in_channels: ${dataset.channels}
"""


@pytest.fixture
def own_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`my_nets` in a directory of its own, importable here (sys.path) like an installed one."""
    package = tmp_path / "src" / "my_nets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(OWN_PACKAGE))
    monkeypatch.syspath_prepend(str(package.parent))
    yield package.parent
    for name in [m for m in sys.modules if m.split(".")[0] == "my_nets"]:
        del sys.modules[name]


def own(head: str, **arguments) -> ModelConfig:
    backbone = {"_target_": "my_nets.TinyResNet", "in_channels": 1, **arguments}
    return ModelConfig(backbone=backbone, head=head)


def test_the_command_line_names_a_network_by_target(own_package) -> None:
    job = compose_config(
        "summary", SummaryJob, ["model.backbone={_target_:my_nets.TinyResNet,in_channels:1}"]
    )
    assert job.model.backbone == {"_target_": "my_nets.TinyResNet", "in_channels": 1}
    assert build_model(job.model, dataset_config()).name == "TinyResNet-fc"


@pytest.mark.parametrize("head", tuple(HEADS))
def test_a_network_of_your_own_takes_every_head(own_package, head: str) -> None:
    model = build_model(own(head), dataset_config()).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *MNIST)).shape == (2, 10)
        if head != "fc":
            assert model(torch.randn(2, 1, 40, 56)).shape == (2, 10)
    assert model.min_input_size == 2  # the 2x2 pool's window


def test_its_summary_measures_shapes_and_leaves_connections_unknown(own_package) -> None:
    model = build_model(own("gap"), dataset_config()).eval()
    seen = {}
    model.backbone.register_forward_hook(lambda m, i, out: seen.update(shape=out.shape[1:]))
    with torch.no_grad():
        model(torch.zeros(1, *MNIST))
    first, *head = layer_rows(model.layers(), MNIST)
    assert (first.name, first.kind, first.output_shape) == ("TinyResNet", "TinyResNet", (32, 7, 7))
    assert first.output_shape == tuple(seen["shape"])
    assert first.connections is None and all(row.connections for row in head)
    assert first.params == sum(p.numel() for p in model.backbone.parameters())
    total = describe(model).splitlines()[-1]
    assert f"{sum(row.connections for row in head):,} + ?" in total
    assert not any(p.is_meta for p in model.parameters())  # measured on copies


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ("vgg", "'model.backbone' = 'vgg' is invalid; allowed: alexnet, lenet5,"),
        ({"_target_": "my_nets.Missing"}, "'my_nets.Missing' cannot be imported"),
        ({"_target_": "my_nets.TinyResNet", "depth": 3}, "unexpected keyword argument 'depth'"),
        ({"_target_": "my_nets.classifier", "in_channels": 1}, "model.head=gap pools feature"),
    ],
)
def test_a_backbone_that_cannot_be_built_is_a_config_error(own_package, backbone, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_model(ModelConfig(backbone=backbone, head="gap"), dataset_config())


@pytest.mark.slow
def test_a_network_of_your_own_trains_evaluates_and_serves(own_package, tmp_path, data_dir):
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "tiny_resnet.yaml").write_text(OWN_MODEL_YAML)
    overrides = [
        f"hydra.searchpath=[file://{conf}]",
        "model=tiny_resnet",
        "trainer.max_epochs=3",
        "optimizer=adam",
        "optimizer.lr=0.01",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    # a user's process: their package importable (PYTHONPATH), this project installed
    user = env() | {"PYTHONPATH": f"{own_package}:{env()['PYTHONPATH']}"}
    command = cli(tmp_path, data_dir, *overrides)
    result = subprocess.run(command, env=user, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    run_id = read_run(tmp_path / "run")["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test/acc"] > 0.5
    summary = Path(client.download_artifacts(run_id, "summary.txt", str(tmp_path)))
    assert "TinyResNet-fc: input 1x28x28 (this size only)" in summary.read_text()
    assert run.data.params["model.backbone._target_"] == "my_nets.TinyResNet"
    sizes = list(by_size(run.data.metrics))
    assert min(sizes) < 28 < max(sizes)  # evaluated below and above its training size

    # the logged model, loaded where my_nets is not importable: it carries the package
    [model] = client.search_logged_models([run.info.experiment_id])
    load = (
        "import sys, json, mlflow, numpy as np\n"
        "assert 'my_nets' not in sys.modules\n"
        f"model = mlflow.pyfunc.load_model('models:/{model.model_id}')\n"
        "images = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)\n"
        "print(json.dumps(model.predict(images).shape))\n"
    )
    served = subprocess.run(
        [sys.executable, "-c", load],
        env=env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout.splitlines()[-1]) == [2, 3]
