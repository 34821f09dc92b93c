"""Hydra entry: train, validate, test and record one model; with `-m`, a sweep.

    python -m pipeline.train model=lenet5 dataset=mnist
    python -m pipeline.train trainer=ddp trainer.devices=2 model=alexnet_spp dataset=cifar10
    python -m pipeline.train model=lenet5 dataset=mnist train.resume=outputs/2026-11-21/12-00-00-0
    python -m pipeline.train -m model.head=fc,gap,spp optimizer.lr=0.01,0.001 hydra/launcher=joblib
    python -m pipeline.train -m hparams_search=digits_optuna

Resuming is the same command plus `train.resume=` the interrupted training's output directory:
it continues from checkpoints/last.ckpt there, in that directory and the same MLflow run. In a
sweep each trial is one training (DDP included) in `multirun/DATE/TIME/N`, its run a child of
the sweep's parent run (pipeline/tracking/sweeps.py); a trial that fails or diverges ends as a
FAILED run and the sweeper records it as failed.
"""

from __future__ import annotations

import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.cli import hydra_entry
from pipeline.config import TrainJob, validate
from pipeline.errors import PipelineError
from pipeline.tracking.sweeps import trial_tags


@hydra_entry("config")
def main(cfg: DictConfig) -> float:
    config = validate(cfg, TrainJob)
    # after validating: a bad config fails before torch, Lightning and MLflow are imported
    from pipeline.training.launch import run_training

    output_dir = Path(HydraConfig.get().runtime.output_dir)  # train.resume's, when resuming
    score = run_training(config, output_dir, trial_tags())["val/acc_best"]
    if not math.isfinite(score):  # a sweeper must get a score or an error, never NaN
        raise PipelineError(f"val/acc_best is {score}: no finite validation accuracy")
    return score


if __name__ == "__main__":
    # Run the importable module's `main`, not this `__main__` copy of it: a parallel sweep
    # (hydra/launcher=joblib) pickles the task to worker processes, where `__main__` functions
    # would not resolve, while `pipeline.train.main` imports by name.
    from pipeline.train import main as importable_main

    importable_main()
