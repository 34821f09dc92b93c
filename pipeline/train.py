"""Hydra entry: train, validate, test and record one model; with `-m`, a sweep.

    python -m pipeline.train model=lenet5 dataset=mnist
    python -m pipeline.train trainer=ddp trainer.devices=2 model=alexnet_spp dataset=cifar10
    python -m pipeline.train model=lenet5 dataset=mnist train.resume=outputs/2026-11-21/12-00-00-0
    python -m pipeline.train -m model.head=fc,gap,spp optimizer.lr=0.01,0.001 hydra/launcher=joblib
    python -m pipeline.train -m hparams_search=digits_optuna

Resuming is the same command plus `train.resume=` the interrupted training's output directory:
it continues from checkpoints/last.ckpt there, in that directory and the same MLflow run.

Every training gets one output directory (checkpoints, run.json, evaluation) and one MLflow
run, however many processes DDP starts: Lightning re-launches this module per rank with the
same Hydra run directory, and only rank 0 talks to MLflow. In a sweep each trial is such a
training (DDP included) in `multirun/DATE/TIME/N`, its run a child of the sweep's parent run
(pipeline/sweeps.py); a trial that fails or diverges ends as a FAILED run and the sweeper
records it as failed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.callbacks import (
    CachedKeyCheckpoint,
    CachedKeyEarlyStopping,
    ProgressBar,
    StopOnDivergence,
)
from pipeline.classifier import Classifier
from pipeline.cli import hydra_entry
from pipeline.config import (
    DataConfig,
    DatasetConfig,
    OptimizerConfig,
    PathsConfig,
    SchedulerConfig,
    TrackingConfig,
    TrainerConfig,
    require,
    validate,
)
from pipeline.data.datamodule import TensorDataModule
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate, log_to_run, write_reports
from pipeline.models import ModelConfig
from pipeline.profiler import build_profiler
from pipeline.summary import describe
from pipeline.sweeps import sweep_job, trial_tags
from pipeline.tracking import (
    RUN_FILE,
    EpochHistory,
    RunLogger,
    RunRecorder,
    git_commit,
    read_run,
    run_name,
)

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    label_smoothing: float = 0.0
    # output directory of an interrupted training: continue it, in the same MLflow run
    resume: str | None = None
    # evaluate the best checkpoint at the end (as `python -m pipeline.evaluate` does): off in
    # dvc.yaml, whose evaluate stage does it
    evaluate: bool = True
    # test resolutions, as multiples of the training size, for the evaluation at the end
    eval_scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.5, 2.0])

    def __post_init__(self) -> None:
        require(
            0 <= self.label_smoothing < 1,
            "train.label_smoothing",
            self.label_smoothing,
            "0 <= value < 1",
        )


@dataclass
class TrainConfig:
    """Schema of `conf/config.yaml` and its groups."""

    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            not self.data.augment.sizes or self.model.head != "fc",
            "data.augment.sizes",
            self.data.augment.sizes,
            "[] with model.head=fc (multi-size training needs a gap or spp head)",
        )


def plain(node: object) -> dict:
    """A dataclass config as plain dicts and lists (for hparams, params and YAML)."""
    return OmegaConf.to_container(OmegaConf.structured(node), enum_to_str=True)  # type: ignore[return-value]


def check_data_matches(meta: dict, dataset: DatasetConfig) -> None:
    """The preprocessed split must be the one the config describes."""
    found = (meta["shape"], meta["splits"]["val"]["count"], meta["split_seed"])
    wanted = (list(dataset.shape), dataset.val_size, dataset.split_seed)
    if found != wanted:
        raise PipelineError(
            f"data/processed/{dataset.name} holds shape/val_size/split_seed = {found}, the config "
            f"asks for {wanted}: run `python -m pipeline.data.preprocess dataset={dataset.name} "
            f"dataset.val_size={dataset.val_size} dataset.split_seed={dataset.split_seed}`"
        )


def resume_point(output_dir: Path) -> tuple[Path, str]:
    """(last checkpoint, MLflow run id) of an interrupted training in `output_dir`."""
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file() or not (output_dir / RUN_FILE).is_file():
        raise PipelineError(
            f"train.resume={output_dir}: no checkpoints/last.ckpt and {RUN_FILE} there; "
            "pass the output directory of a training that ran at least one epoch"
        )
    return checkpoint, read_run(output_dir)["run_id"]


def build_module(cfg: TrainConfig, meta: dict) -> Classifier:
    """The LightningModule for `cfg`, normalising with the preprocessed data's statistics."""
    return Classifier(
        model=plain(cfg.model),
        dataset=plain(cfg.dataset),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        mean=meta["train_mean"],
        std=meta["train_std"],
        augment=plain(cfg.data.augment),
        label_smoothing=cfg.train.label_smoothing,
    )


def train(
    cfg: TrainConfig,
    output_dir: Path,
    run_tags: Mapping[str, str] | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
) -> dict[str, float]:
    """Fit, test and evaluate one model; returns the final metrics (on rank 0: all of them).

    `run_tags` go on a new MLflow run (a sweep trial: `mlflow.parentRunId`); `extra_callbacks`
    join the training's own (`make bench` times the steps with one). A training whose loss stops
    being finite ends its run as FAILED and raises a PipelineError (on rank 0).
    """
    L.seed_everything(cfg.seed, workers=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = TensorDataModule(
        cfg.paths.processed_dir(cfg.dataset.name),
        cfg.data.batch_size,
        cfg.data.eval_batch_size,
        cfg.seed,
    )
    check_data_matches(datamodule.meta, cfg.dataset)
    module = build_module(cfg, datamodule.meta)
    checkpoint, run_id = resume_point(output_dir) if cfg.train.resume else (None, None)
    logger = RunLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=run_name(cfg.model.backbone, cfg.model.head, cfg.dataset.name),
        tracking_uri=cfg.mlflow.tracking_uri,
        run_id=run_id,
        tags=dict(run_tags or {}),
    )
    recorder = RunRecorder(
        params=plain(cfg),
        config_yaml=OmegaConf.to_yaml(plain(cfg)),
        summary=describe(module.network),
        tags={
            "git_commit": git_commit(Path.cwd()),
            "data_sha256": datamodule.meta["sha256"],
            "output_dir": str(output_dir.resolve()),
            "model": module.network.name,
        },
        output_dir=output_dir,
        tracking_uri=cfg.mlflow.tracking_uri,
        resumed=checkpoint is not None,
    )
    best = CachedKeyCheckpoint(
        output_dir / "checkpoints", "best", "val/acc", mode="max", enable_version_counter=False
    )
    # Lightning's save_last only writes when `best` does; resuming needs every epoch's state.
    last = CachedKeyCheckpoint(output_dir / "checkpoints", "last", enable_version_counter=False)
    divergence = StopOnDivergence()
    history = EpochHistory(output_dir / "history.csv")
    callbacks = [best, last, LearningRateMonitor("epoch"), recorder, divergence, history]
    callbacks.extend(extra_callbacks)
    if patience := cfg.trainer.early_stopping_patience:
        callbacks.append(CachedKeyEarlyStopping("val/acc", mode="max", patience=patience))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        deterministic=cfg.trainer.deterministic,
        max_epochs=cfg.trainer.max_epochs,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        profiler=build_profiler(cfg.trainer.profiler, output_dir),
        logger=logger,
        callbacks=[*callbacks, ProgressBar()],
        default_root_dir=output_dir,
    )
    trainer.fit(module, datamodule, ckpt_path=checkpoint)
    if divergence.epoch is not None:  # every rank stopped; rank 0 reports it
        if not trainer.is_global_zero:
            return {"val/acc_best": float(best.best_model_score or 0.0)}
        logger.experiment.set_terminated(logger.run_id, "FAILED")
        raise PipelineError(
            f"training diverged: train/loss is not finite after epoch {divergence.epoch} "
            f"(optimizer.lr={cfg.optimizer.lr}, optimizer.weight_decay="
            f"{cfg.optimizer.weight_decay}); lower the learning rate or the weight decay"
        )
    trainer.test(module, datamodule, ckpt_path=best.best_model_path, verbose=trainer.is_global_zero)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["val/acc_best"] = float(best.best_model_score or 0.0)
    if not trainer.is_global_zero:
        return metrics
    logger.log_metrics({"val/acc_best": metrics["val/acc_best"]})
    logger.flush()
    if cfg.mlflow.log_checkpoint:
        logger.experiment.log_artifact(logger.run_id, best.best_model_path, "evaluation")
    if cfg.train.evaluate:  # `module` holds the best weights: trainer.test loaded them
        test = datamodule.splits["test"]
        evaluation = evaluate(module, test, cfg.train.eval_scales, cfg.data.eval_batch_size)
        files = write_reports(evaluation, module, test, output_dir / "eval")
        log_to_run(output_dir, files, evaluation)
        metrics.update({f"test/acc_at_{r['size']}px": r["accuracy"] for r in evaluation.resolution})
    log.info("output: %s  mlflow run: %s", output_dir, logger.run_id)
    return metrics


@hydra_entry("config")
def main(cfg: DictConfig) -> float:
    config = validate(cfg, TrainConfig)
    output_dir = Path(HydraConfig.get().runtime.output_dir)  # train.resume's, when resuming
    torch.set_float32_matmul_precision("high")
    with sweep_job():  # in a sweep: this trial's own run dir and command line for DDP ranks
        score = train(config, output_dir, trial_tags())["val/acc_best"]
    if not math.isfinite(score):  # a sweeper must get a score or an error, never NaN
        raise PipelineError(f"val/acc_best is {score}: no finite validation accuracy")
    return score


if __name__ == "__main__":
    # Run the importable module's `main`, not this `__main__` copy of it: a parallel sweep
    # (hydra/launcher=joblib) pickles the task to worker processes, where `__main__` classes
    # such as TrainConfig would not resolve, while `pipeline.train.main` imports by name.
    from pipeline.train import main as importable_main

    importable_main()
