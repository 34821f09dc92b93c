"""One training, start to end: data, module, callbacks and logger, fit, test, record.

`train` runs in every process of a training: the only one, or each DDP rank (see
`pipeline.training.launch`). Only rank 0 talks to MLflow and evaluates. A training continues
an interrupted one (its last checkpoint, its MLflow run) when asked to (`train.resume`) and
when SLURM restarted its job, once `pipeline.training.resume` found it the same training.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from pipeline.config import DatasetConfig, TrainerConfig, TrainJob
from pipeline.data.datamodule import TensorDataModule
from pipeline.errors import PipelineError
from pipeline.evaluation.evaluate import evaluate_run
from pipeline.evaluation.logged_model import log_model
from pipeline.models.summary import describe
from pipeline.search.study import PRUNED_AT, StudyTrial
from pipeline.tracking.runs import (
    TrainingRun,
    dataset_inputs,
    git_commit,
    run_name,
    size_metric,
)
from pipeline.tracking.store import without_credentials
from pipeline.tracking.sweeps import global_rank, trial_name
from pipeline.training.callbacks import (
    EpochHistory,
    ProgressBar,
    PruneOnReport,
    RunMetrics,
    StopOnDivergence,
)
from pipeline.training.checkpoint_io import VerifiedCheckpointIO
from pipeline.training.module import Classifier
from pipeline.training.resume import (
    Continuation,
    RecordSettings,
    continued_from,
    resume_tags,
)

log = logging.getLogger(__name__)


def train(
    cfg: TrainJob,
    output_dir: Path,
    run_tags: Mapping[str, str] | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
    trial: StudyTrial | None = None,
    datamodule: TensorDataModule | None = None,
) -> dict[str, float]:
    """Fit, test and record one model; returns its final metrics (on rank 0: all of them).

    `run_tags` go on a new MLflow run (a sweep trial: `mlflow.parentRunId`); `extra_callbacks`
    join the training's own (`make bench` times the steps with one). A training whose loss stops
    being finite ends its run as FAILED and raises a PipelineError (on rank 0). A search's
    `trial` reports every epoch to its study; pruned, it ends its run as KILLED, untested, and
    returns the epoch it stopped after (`PRUNED_AT`). `datamodule`: the data as its caller
    already opened (and verified) it; None: opened here.
    """
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    # checked before anything is written or recorded: a refused resume leaves all as it was
    continuation = continued_from(cfg, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if datamodule is None:
        datamodule = open_data(cfg)
    module = Classifier.from_config(cfg, datamodule.meta)
    if cfg.trainer.compile:
        # in place (torch.nn.Module.compile): the checkpoint keeps the eager model's keys
        module.model.compile()
    # opened before DDP's ranks meet, so that a training whose ranks never meet still has its
    # run, FAILED: it ends as the training does (TrainingRun's status), on rank 0, its owner
    run = open_run(cfg, output_dir, continuation, run_tags) if global_rank() == 0 else None
    with run or contextlib.nullcontext():
        if run is not None and continuation is None:
            record_start(cfg, run, module, datamodule.meta, output_dir)
        if run is not None and trial is not None:
            trial.record_run(run.id)
        return fit_and_test(
            cfg, module, datamodule, output_dir, run, continuation, trial, extra_callbacks
        )


def fit_and_test(
    cfg: TrainJob,
    module: Classifier,
    datamodule: TensorDataModule,
    output_dir: Path,
    run: TrainingRun | None,
    continuation: Continuation | None,
    trial: StudyTrial | None,
    extra_callbacks: Sequence[L.Callback],
) -> dict[str, float]:
    """`train` once its run is open (on rank 0: `run`; other ranks: None)."""
    best, divergence, callbacks = build_callbacks(cfg, output_dir)
    pruning = PruneOnReport(trial) if trial else None
    uri = without_credentials(cfg.mlflow.tracking_uri)
    trainer = L.Trainer(
        **cfg.trainer.lightning_args() | {"strategy": strategy(cfg.trainer)},
        logger=RunMetrics(tracking_uri=uri, run_id=run.id if run else None),
        callbacks=[*callbacks, *([pruning] if pruning else []), *extra_callbacks],
        default_root_dir=output_dir,
        plugins=[VerifiedCheckpointIO()],
    )
    checkpoint = continuation.checkpoint if continuation else None
    phases = Phases()
    with phases("fit"):
        trainer.fit(module, datamodule, ckpt_path=checkpoint)
    if divergence.epoch is not None:
        return stop_diverged(cfg, run, divergence, best, checkpoint)
    if pruning and pruning.epoch is not None:
        return stop_pruned(run, pruning.epoch, best)
    with phases("test"):
        trainer.test(module, datamodule, ckpt_path=best.best_model_path, verbose=run is not None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["val/acc_best"] = float(best.best_model_score or 0.0)
    if run is not None:
        metrics |= record(
            cfg,
            run,
            module,
            datamodule,
            best,
            output_dir,
            metrics["val/acc_best"],
            trainer.global_step,
            phases,
        )
        run.log_metrics(phases.seconds)
    return metrics


class Phases:
    """The seconds each phase of a training took, as metrics (time/fit_s, time/test_s,
    time/model_s, time/evaluation_s): where a training's time went, beside its start-up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[f"time/{phase}_s"] = round(time.perf_counter() - start, 3)


def strategy(trainer: TrainerConfig) -> str | DDPStrategy:
    """Lightning's strategy by its name; DDP's with `trainer.ddp_timeout_s` as torch's timeout
    (its default: 30 minutes, and rank 0's store then waits that long for a rank that never
    starts, and a rank for a rank 0 that never answers)."""
    if trainer.strategy != "ddp":
        return trainer.strategy
    return DDPStrategy(timeout=timedelta(seconds=trainer.ddp_timeout_s))


def open_run(
    cfg: TrainJob,
    output_dir: Path,
    continuation: Continuation | None,
    run_tags: Mapping[str, str] | None,
) -> TrainingRun:
    """The training's MLflow run: the one it continues, or a new one with `run_tags`."""
    uri = cfg.mlflow.tracking_uri
    if continuation is not None:
        tags = resume_tags(continuation.changes)
        return TrainingRun.resume(uri, continuation.run_id, tags, output_dir)
    name = (
        cfg.mlflow.run_name
        or trial_name()
        or run_name(cfg.model.backbone_name, cfg.model.head, cfg.dataset.name)
    )
    return TrainingRun.start(uri, cfg.mlflow.experiment, name, run_tags or {}, output_dir)


def record_start(
    cfg: TrainJob, run: TrainingRun, module: Classifier, meta: dict, output_dir: Path
) -> None:
    """What a new run records before fitting: the config, the code, the data, the network."""
    run.record_training(
        asdict(cfg),
        describe(module.model.network),
        tags={
            "git_commit": git_commit(Path.cwd()),
            "data_sha256": meta["sha256"],
            "output_dir": str(output_dir.resolve()),
            "model": module.model.network.name,
            # what the training got: a packed search gives each trial its share of the cores
            "torch.threads": str(torch.get_num_threads()),
        },
        datasets=dataset_inputs(meta, cfg.paths.processed_dir(cfg.dataset.name)),
    )


def build_callbacks(
    cfg: TrainJob, output_dir: Path
) -> tuple[ModelCheckpoint, StopOnDivergence, list[L.Callback]]:
    """(best checkpoint, divergence stop, every callback of the training)."""
    best = ModelCheckpoint(
        output_dir / "checkpoints", "best", "val/acc", mode="max", enable_version_counter=False
    )
    # Lightning's save_last only writes when `best` does; resuming needs every epoch's state.
    last = ModelCheckpoint(output_dir / "checkpoints", "last", enable_version_counter=False)
    divergence = StopOnDivergence()
    callbacks: list[L.Callback] = [best, last, divergence]
    callbacks.append(RecordSettings(cfg))
    callbacks.append(EpochHistory(output_dir / "history.csv"))
    callbacks += [LearningRateMonitor("epoch"), ProgressBar()]
    if patience := cfg.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping("val/acc", mode="max", patience=patience))
    return best, divergence, callbacks


def record(
    cfg: TrainJob,
    run: TrainingRun,
    module: Classifier,
    datamodule: TensorDataModule,
    best: ModelCheckpoint,
    output_dir: Path,
    best_score: float,
    step: int,
    phases: Phases,
) -> dict[str, float]:
    """Rank 0, after testing: the best score and checkpoint to the run, its MLflow model, then
    the evaluation (`module` holds the best weights: trainer.test loaded them); returns its
    metrics."""
    # at the test's step, with the test's metrics: what the MLflow model takes as its own
    run.log_metric("val/acc_best", best_score, step=step)
    checkpoint = str(Path(best.best_model_path).resolve())
    if cfg.mlflow.log_checkpoint:
        run.log_artifact(Path(best.best_model_path), "evaluation")
        checkpoint = f"runs:/{run.id}/evaluation/{Path(checkpoint).name}"
    if cfg.mlflow.log_model:
        with phases("model"):
            log_model(module, datamodule.splits["test"].images[:2], step, checkpoint, run.name)
    log.info("output: %s  mlflow run: %s", output_dir, run.id)
    if not cfg.train.evaluate:
        return {}
    test = datamodule.splits["test"]
    with phases("evaluation"):
        evaluation = evaluate_run(module.model, test, cfg.evaluation, output_dir / "eval", run)
    return {size_metric(r["size"]): r["accuracy"] for r in evaluation.resolution}


def open_data(cfg: TrainJob) -> TensorDataModule:
    """The preprocessed splits (loaded in `setup`), checked against the dataset config."""
    datamodule = TensorDataModule(
        cfg.paths.processed_dir(cfg.dataset.name),
        cfg.data.batch_size,
        cfg.evaluation.batch_size,
        cfg.seed,
    )
    check_data_matches(datamodule.meta, cfg.dataset)
    return datamodule


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


def stop_diverged(
    cfg: TrainJob,
    run: TrainingRun | None,
    divergence: StopOnDivergence,
    best: ModelCheckpoint,
    resumed_from: Path | None,
) -> dict[str, float]:
    """Every rank stopped after the epoch that diverged; rank 0 raises, saying what to change,
    and its run ends FAILED (its checkpoints keep the last finite weights:
    VerifiedCheckpointIO)."""
    if run is None:
        return {"val/acc_best": float(best.best_model_score or 0.0)}
    if resumed_from and divergence.epoch == divergence.first_epoch:
        raise PipelineError(
            f"training diverged in its first epoch after resuming from {resumed_from}: "
            "train/loss is not finite, so that checkpoint is suspect (damaged, or written by "
            "a training already diverging); resume from an earlier copy or start a new training"
        )
    raise PipelineError(
        f"training diverged: train/loss is not finite after epoch {divergence.epoch} "
        f"(optimizer.lr={cfg.optimizer.lr}, optimizer.weight_decay="
        f"{cfg.optimizer.weight_decay}); lower the learning rate or the weight decay"
    )


def stop_pruned(run: TrainingRun | None, epoch: int, best: ModelCheckpoint) -> dict[str, float]:
    """Every rank stopped after `epoch`, as the study's pruner said; rank 0 ends the run as
    KILLED, its curves as far as they went (the trial tags it with its state when it tells the
    study: pipeline.search.study)."""
    if run is not None:
        run.end("KILLED")
        log.info("pruned after epoch %d: trailing the study's other trials", epoch)
    return {"val/acc_best": float(best.best_model_score or 0.0), PRUNED_AT: float(epoch)}
