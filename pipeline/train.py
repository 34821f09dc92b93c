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
FAILED run and the sweeper records it as failed. A trial of an Optuna search (pipeline/search/)
reports val/acc to its study every epoch, stops when pruned, and tells the study its result.
Returns the training's metrics (a sweeper's objective is one of them).
"""

from __future__ import annotations

import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import hydra_entry
from pipeline.config import OPTUNA_SWEEPER, TrainJob, validate
from pipeline.errors import ConfigError, PipelineError
from pipeline.search.study import PRUNED_AT, StudyTrial, default_storage
from pipeline.search.sweeper import study_name
from pipeline.tracking.preflight import check_store
from pipeline.tracking.sweeps import global_rank, trial_tags


@hydra_entry("config")
def main(cfg: DictConfig) -> dict[str, float]:
    config = validate(cfg, TrainJob)
    check_store(config.mlflow.tracking_uri, config.mlflow.timeout_s)
    # after validating: a bad config fails before torch, Lightning and MLflow are imported
    from pipeline.training.launch import run_training

    output_dir = Path(HydraConfig.get().runtime.output_dir)  # train.resume's, when resuming
    trial = study_trial(config)
    tags = trial_tags() | (trial.tags() if trial else {})

    def training() -> dict[str, float]:
        metrics = run_training(config, output_dir, tags, trial)
        score = metrics["val/acc_best"]
        if PRUNED_AT not in metrics and not math.isfinite(score):  # never NaN to a sweeper
            raise PipelineError(f"val/acc_best is {score}: no finite validation accuracy")
        return metrics

    # a trial of a search reports to its study: once, from its first rank
    return trial.run(training, output_dir) if trial and global_rank() == 0 else training()


def study_trial(config: TrainJob) -> StudyTrial | None:
    """The study trial this training is (search.trial, set by the Optuna sweeper); the study's
    storage and pruner come from the sweeper's own config."""
    if config.search.trial is None:
        return None
    hydra = HydraConfig.get()
    if hydra.sweeper._target_ != OPTUNA_SWEEPER:
        raise ConfigError("search.trial is set by hydra/sweeper=optuna, never by hand")
    options = OmegaConf.to_container(hydra.sweeper, resolve=True)
    assert isinstance(options, dict)
    return StudyTrial(
        storage=default_storage(options["storage"], config.mlflow.tracking_uri),
        study_name=study_name(
            options["study_name"], config.mlflow.experiment, hydra.runtime.choices
        ),
        number=config.search.trial,
        monitor=options["monitor"],
        objective=options["objective"],
        heartbeat_s=options["heartbeat_s"],
        pruner=options["pruner"],
    )


if __name__ == "__main__":
    # Run the importable module's `main`, not this `__main__` copy of it: a parallel sweep
    # (hydra/launcher=joblib) pickles the task to worker processes, where `__main__` functions
    # would not resolve, while `pipeline.train.main` imports by name.
    from pipeline.train import main as importable_main

    importable_main()
