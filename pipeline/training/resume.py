"""What a training continues, checked before anything runs: a resume continues the same
training or refuses, and never touches a run whose record is final.

A training continues an interrupted one when asked to (`train.resume`) and when SLURM restarted
its job. Its last checkpoint must be the one written (pipeline.training.checkpoints) and hold
the same training: every setting but where and how it runs (RUNTIME) equal to the one the
checkpoint recorded, except those `train.resume_changes` names on purpose, which the resumed
run records as a tag. A finished run stays as it was recorded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
from mlflow.exceptions import MlflowException

from pipeline.checkpoints import read_checkpoint, weights_finite
from pipeline.config import CHANGEABLE_ON_RESUME, TrainJob, mask_password
from pipeline.errors import PipelineError
from pipeline.tracking.runs import flatten
from pipeline.tracking.store import RUN_FILE, read_run, tracking_client

log = logging.getLogger(__name__)

LAST_CHECKPOINT = Path("checkpoints", "last.ckpt")  # in the output directory: where to resume
CONFIG_KEY = "config"  # a checkpoint's copy of its training's config, flattened

# settings of where and how a training runs and what it records: free to differ on resume
RUNTIME = (
    "train.resume",
    "train.resume_changes",
    "train.evaluate",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.threads",
    "trainer.device",
    "trainer.ddp_timeout_s",
    "trainer.profiler",
    "trainer.log_every_n_steps",
    "trainer.compile",
    "mlflow.",
    "paths.",
    "evaluation.",
    "search.",
    "dataset.mirrors",
    "dataset.checksums",
)

# a schedule built for a number of epochs or steps, which its restored state keeps
SCHEDULE_LENGTH = {
    "cosine": ("trainer.max_epochs",),
    "onecycle": ("trainer.max_epochs", "data.batch_size"),
}


@dataclass(frozen=True)
class Continuation:
    run_id: str
    checkpoint: Path | None  # None: a SLURM job restarted before its first checkpoint
    changes: dict[str, str]  # setting -> "old -> new": what train.resume_changes changed


def training_settings(cfg: TrainJob) -> dict[str, str]:
    """What defines the training (no RUNTIME setting: no store URI, so no password), as flat
    strings: what a checkpoint records."""
    return {k: v for k, v in flatten(asdict(cfg)) if not k.startswith(RUNTIME)}


class RecordSettings(L.Callback):
    """Puts the training's settings into every checkpoint, for a resume to compare."""

    def __init__(self, cfg: TrainJob) -> None:
        self.settings = training_settings(cfg)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict
    ) -> None:
        checkpoint[CONFIG_KEY] = self.settings


def resume_tags(changes: dict[str, str]) -> dict[str, str]:
    """What a resume records in its run: the settings it changed on purpose."""
    return {"resume.changes": ", ".join(f"{k} {v}" for k, v in changes.items())} if changes else {}


def continued_from(cfg: TrainJob, output_dir: Path) -> Continuation | None:
    """The training this one continues, verified; None for a new one.

    With `train.resume`: the interrupted training in `output_dir`. In a SLURM job that SLURM
    restarted (preempted, `scontrol requeue`, or requeued at its time limit), which reruns the
    same command in the same directory: what the earlier start left there, its run and its
    last checkpoint, if it got as far as saving one."""
    checkpoint = output_dir / LAST_CHECKPOINT
    if cfg.train.resume:
        if not checkpoint.is_file() or not (output_dir / RUN_FILE).is_file():
            raise PipelineError(
                f"train.resume={output_dir}: no {LAST_CHECKPOINT} and {RUN_FILE} there; "
                "pass the output directory of a training that ran at least one epoch"
            )
    elif (
        int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0
        or not (output_dir / RUN_FILE).is_file()
    ):
        return None
    else:
        log.info("SLURM restarted this job: continuing the training in %s", output_dir)
    changes = check_same_training(cfg, checkpoint) if checkpoint.is_file() else {}
    run_id = read_run(output_dir)["run_id"]
    check_run_open(cfg.mlflow.tracking_uri, run_id, output_dir)
    return Continuation(run_id, checkpoint if checkpoint.is_file() else None, changes)


def check_run_open(tracking_uri: str, run_id: str, output_dir: Path) -> None:
    """The run is in this store and not finished: a finished run's record is final."""
    try:
        status = tracking_client(tracking_uri).get_run(run_id).info.status
    except MlflowException as err:
        raise PipelineError(
            f"train.resume={output_dir}: its MLflow run {run_id} is not in "
            f"mlflow.tracking_uri={mask_password(tracking_uri)}; resume with the store it was "
            "recorded in"
        ) from err
    if status == "FINISHED":
        raise PipelineError(
            f"train.resume={output_dir}: its MLflow run {run_id} finished, and a finished "
            "run stays as recorded; to train on, start a new training (no train.resume)"
        )


def check_same_training(cfg: TrainJob, checkpoint: Path) -> dict[str, str]:
    """The settings train.resume_changes changes ("old -> new"); a PipelineError naming every
    other setting that differs from the checkpoint's."""
    contents = read_checkpoint(checkpoint)
    if not weights_finite(contents["state_dict"]):
        raise PipelineError(
            f"{checkpoint} holds weights that are not finite: it was written by a diverging "
            "training; start a new training (no train.resume)"
        )
    recorded = contents.get(CONFIG_KEY)
    if recorded is None:
        log.warning("%s records no config (an older checkpoint): settings not compared", checkpoint)
        return {}
    now = training_settings(cfg)
    differing = {
        key: f"{recorded.get(key)} -> {value}"
        for key, value in now.items()
        if recorded.get(key) != value
    }
    refused = {
        key: change for key, change in differing.items() if key not in cfg.train.resume_changes
    }
    if refused:
        listed = ", ".join(f"{key} {change}" for key, change in refused.items())
        raise PipelineError(
            f"train.resume={checkpoint.parent.parent} continues the training in {checkpoint}, "
            f"but these settings differ from it: {listed}. Drop those overrides to continue it, "
            "or start a new training (no train.resume); a resume changes only "
            f"{', '.join(CHANGEABLE_ON_RESUME)} on purpose: train.resume_changes=[KEY,...]"
        )
    fixed = SCHEDULE_LENGTH.get(cfg.scheduler.name, ())
    if stuck := [key for key in differing if key in fixed]:
        raise PipelineError(
            f"train.resume_changes: {', '.join(stuck)} cannot change on resume with "
            f"scheduler={cfg.scheduler.name}: its restored schedule keeps the old length; "
            "start a new training"
        )
    return differing
