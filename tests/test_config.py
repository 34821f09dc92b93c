"""Config: schemas with each default written once, and errors that name the key and what is
allowed, before any data moves."""

from __future__ import annotations

from datetime import datetime

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.cli import CONF_DIR, compose_config
from pipeline.config import (
    HEAD_NAMES,
    DatasetConfig,
    EvaluateJob,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
)
from pipeline.errors import ConfigError
from pipeline.tracking.sweeps import SLURM_LAUNCHER
from tests.conftest import run_module, train_config

SCHEMAS = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "trainer": TrainerConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
}


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_group_yaml_holds_only_what_differs_from_its_schema(group: str):
    defaults = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group]))  # MISSING: '???'
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        repeated = {k for k, v in values.items() if k in defaults and defaults[k] == v}
        assert not repeated, f"{path.name} repeats the schema's defaults for {repeated}"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.name=rmsprop", "sgd, adam, adamw"),
        ("trainer.devices=0", "trainer.devices"),
        ("model.head=mlp", "fc, gap, spp"),
        ("+trainer.max_epoch=3", "max_epoch"),
        ("data.augment.scale_range=[2,1]", "data.augment.scale_range"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("trainer.profiler=fast", "simple, advanced, pytorch"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(override: str, named: str):
    with pytest.raises(ConfigError, match=named):
        train_config(override)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ((), "trainer.accelerator=cpu: a CUDA graph replays GPU work"),
        (("trainer=gpu", "trainer.strategy=ddp"), "DDP: its backward pass exchanges gradients"),
        (("trainer=gpu", "trainer.precision=16-mixed"), "its gradient scaler decides each step"),
        (("trainer=gpu", "trainer.compile=true"), "torch.compile makes graphs of its own"),
    ],
)
def test_cuda_graphs_are_refused_at_start_where_a_replay_would_differ(overrides, why):
    with pytest.raises(ConfigError, match=r"trainer\.cuda_graph") as refused:
        train_config(*overrides, "trainer.cuda_graph=true")
    assert why in str(refused.value)
    # on one GPU, bf16 or float32, the config stands (its graphs need the GPU only to run)
    assert train_config("trainer=gpu", "trainer.cuda_graph=true").trainer.cuda_graph


def test_bad_registered_model_name_fails_at_start_naming_the_key():
    with pytest.raises(ConfigError, match="'register'"):
        compose_config("evaluate", EvaluateJob, ["run_dir=runs/x", "register=a/b"])


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigError, match="adamw"):
        train_config("optimizer=rmsprop")


def test_bad_value_fails_before_any_data_is_loaded(tmp_path):
    result = run_module(
        "pipeline.train",
        "trainer.precision=8-bit",
        f"paths.data_dir={tmp_path / 'none'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "trainer.precision" in result.stdout and "32-true" in result.stdout
    assert "no preprocessed data" not in result.stdout
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


def test_sweeps_and_runs_started_in_the_same_second_get_their_own_dirs():
    # each dir names the moment its config was composed to the microsecond: two composed one
    # after the other, in the same second or not, never share one
    def resolve() -> tuple[str, str]:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", return_hydra_config=True)
        return str(cfg.hydra.sweep.dir), str(cfg.hydra.run.dir)

    before = datetime.now()
    first = resolve()
    between = datetime.now()
    second = resolve()
    after = datetime.now()
    for (sweep_dir, run_dir), start, end in [(first, before, between), (second, between, after)]:
        assert start <= datetime.strptime(sweep_dir, "multirun/%Y-%m-%d/%H-%M-%S-%f") <= end
        assert start <= datetime.strptime(run_dir, "outputs/%Y-%m-%d/%H-%M-%S-%f") <= end
    assert first[0] != second[0] and first[1] != second[1]


def test_slurm_launcher_sizes_each_trial_job_from_the_trainer():
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        launcher = compose("config", overrides, return_hydra_config=True).hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER  # what the sweep's tracking looks for
    # one task per device on each node: SLURM starts the DDP ranks
    assert (launcher.nodes, launcher.tasks_per_node) == (2, 4)
    assert launcher.additional_parameters.requeue and launcher.max_num_timeout > 0
    assert not launcher.setup  # rank 0's address comes from SLURM (pipeline.training.launch)


def test_declared_names_are_exactly_the_registered_builders():
    from pipeline.models import HEADS

    assert sorted(HEADS) == sorted(HEAD_NAMES)
    with pytest.raises(ValueError, match=r"not declared in pipeline\.config"):
        HEADS.add("mlp", HEADS["fc"])
