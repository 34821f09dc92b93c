"""DVC stage `evaluate`: a training's best checkpoint on the test split, at several sizes.

    python -m pipeline.evaluate run_dir=outputs/2026-11-21/12-00-00-000000 [register=NAME]

The checkpoint loads with `weights_only=True` (its hyperparameters are plain values); the
reports go to `out_dir` (default: RUN_DIR/eval) and to the training's MLflow run. What it reads
(the run directory, its checkpoint, the test split) is checked before anything is written, and
the reports reach `out_dir` only once all are written. With `register`, the training's MLflow
model becomes a version of registered model NAME, and its @champion when it beats that one's
test accuracy.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.cli import hydra_entry
from pipeline.config import EvaluateJob, validate
from pipeline.data.store import load_split
from pipeline.errors import PipelineError
from pipeline.evaluation.evaluate import (
    check_out_dir,
    check_run_dir,
    evaluate_run,
    load_checkpoint,
)
from pipeline.evaluation.logged_model import register
from pipeline.tracking.runs import TrainingRun


@hydra_entry("evaluate")
def main(cfg: DictConfig) -> None:
    config = validate(cfg, EvaluateJob)
    run_dir = Path(config.run_dir)
    out_dir = Path(config.out_dir) if config.out_dir else run_dir / "eval"
    check_run_dir(run_dir, config.checkpoint)
    check_out_dir(out_dir)
    run = TrainingRun.recorded_in(run_dir, config.timeout_s)
    module = load_checkpoint(run_dir / config.checkpoint)
    test = load_split(config.paths.processed_dir(module.dataset_cfg.name), "test")
    evaluate_run(module, test, config.evaluation, out_dir, run)
    if config.register:
        if run is None:
            raise PipelineError(f"register={config.register}: {run_dir} recorded no MLflow run")
        register(run.client, run.id, config.register)


if __name__ == "__main__":
    main()
