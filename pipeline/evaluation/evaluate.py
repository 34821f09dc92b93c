"""Evaluation of a trained classifier on the test split, in one place for both callers: the
end of a training (`train.evaluate=true`) and `python -m pipeline.evaluate` (DVC's stage).

It writes to an output directory metrics.json, the plot data DVC reads (predictions.csv for the
confusion matrix, resolution.csv for accuracy versus input size) and PNG figures, and logs all
of them to the training's MLflow run; the files reach the output directory only once all are
written and logged, so a failed evaluation leaves the directory as it was. The resolution
curve is the question He et al. 2015 and Lin et al. 2013 answer with SPP and GAP: those heads
take each size natively; fc heads only their training size, so their images are resized back
to it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoints import read_checkpoint
from pipeline.config import EvaluationConfig
from pipeline.data.augment import resize
from pipeline.data.store import Split, staged_files
from pipeline.errors import PipelineError
from pipeline.evaluation.figures import (
    Curve,
    confusion_figure,
    kernels_figure,
    misclassified_figure,
    resolution_figure,
)
from pipeline.models import ImageClassifier, build_classifier
from pipeline.tracking.runs import TrainingRun, size_metric, split_dataset
from pipeline.tracking.store import RUN_FILE

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    accuracy: float
    per_class: list[float]
    confusion: torch.Tensor  # K x K counts, rows: true class, columns: predicted
    labels: torch.Tensor
    predictions: torch.Tensor
    resolution: list[dict[str, float]]  # size, scale, accuracy
    # the smallest side the network takes (fc: its one size, other sizes are resized to it)
    min_input_size: int


@torch.no_grad()
def predict(
    module: ImageClassifier, images: torch.Tensor, batch_size: int, size: int | None = None
):
    """Predicted classes; at `size` x `size` if given (FC networks: and back to their own)."""
    network = module.network
    own = network.expected_input[-1]
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(module.device)
        if size is not None:
            batch = resize(batch, size, size)
            if network.fixed_size:
                batch = resize(batch, own, own)
        predictions.append(module(batch).argmax(dim=1).cpu())
    return torch.cat(predictions)


def evaluate(
    module: ImageClassifier, test: Split, scales: list[float], batch_size: int
) -> Evaluation:
    module.eval()
    classes = len(module.dataset_cfg.classes)
    labels = test.labels.cpu()
    predictions = predict(module, test.images, batch_size)
    confusion = torch.bincount(labels * classes + predictions, minlength=classes**2)
    confusion = confusion.view(classes, classes)
    per_class = (confusion.diag() / confusion.sum(1).clamp_min(1)).tolist()
    network = module.network
    own = network.expected_input[-1]
    smallest = own if network.fixed_size else network.min_input_size
    resolution, below = [], []
    for scale in scales:
        size = round(own * scale)
        if not network.fixed_size and size < smallest:
            below.append(size)
            continue
        at_size = predict(module, test.images, batch_size, size)
        accuracy = (at_size == labels).float().mean().item()
        resolution.append({"size": size, "scale": scale, "accuracy": accuracy})
    if below:
        log.warning("%s takes inputs from %d px: not tested at %s", network.name, smallest, below)
    return Evaluation(
        accuracy=(predictions == labels).float().mean().item(),
        per_class=per_class,
        confusion=confusion,
        labels=labels,
        predictions=predictions,
        resolution=resolution,
        min_input_size=smallest,
    )


def write_reports(
    evaluation: Evaluation, module: ImageClassifier, test: Split, out_dir: Path, label: str
) -> list[Path]:
    """metrics.json, DVC plot data and PNG figures in `out_dir`, its curves labelled `label`
    (the training's name); returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(module.dataset_cfg.classes)
    metrics = {  # the row `dvc metrics show` prints for this model
        "test_acc": evaluation.accuracy,
        "test_acc_at_size": {str(r["size"]): r["accuracy"] for r in evaluation.resolution},
        "min_input_size": evaluation.min_input_size,
        "fixed_size": module.network.fixed_size,
        "params": sum(p.numel() for p in module.network.parameters() if p.requires_grad),
    }
    per_class = dict(zip(classes, evaluation.per_class, strict=True))
    files = [out_dir / "metrics.json", out_dir / "predictions.csv", out_dir / "resolution.csv"]
    files[0].write_text(json.dumps(metrics, indent=2) + "\n")
    files.append(out_dir / "class_acc.json")
    files[-1].write_text(json.dumps(per_class, indent=2) + "\n")
    with files[1].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        for actual, predicted in zip(evaluation.labels, evaluation.predictions, strict=True):
            writer.writerow([classes[actual], classes[predicted]])
    with files[2].open("w", newline="") as handle:  # a run's curve in the dataset's figure
        writer = csv.DictWriter(handle, fieldnames=["model", "size", "scale", "accuracy"])
        writer.writeheader()
        writer.writerows({"model": label, **r} for r in evaluation.resolution)
    figures = {
        "confusion.png": confusion_figure(evaluation.confusion, classes),
        "misclassified.png": misclassified_figure(
            test.images.cpu(), evaluation.labels, evaluation.predictions, classes
        ),
        "kernels.png": kernels_figure(module.network.first_conv().weight),
        "resolution.png": resolution_figure(
            [
                Curve(
                    label,
                    evaluation.resolution,
                    evaluation.min_input_size,
                    module.network.fixed_size,
                )
            ]
        ),
    }
    for name, figure in figures.items():
        figure.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        files.append(out_dir / name)
    return files


def log_to_run(
    run: TrainingRun,
    files: list[Path],
    evaluation: Evaluation,
    module: ImageClassifier,
    test: Split,
) -> None:
    """Attach the reports to the training's MLflow run; its metrics to the run and its model:
    one per input size (test/acc_28px), and the smallest input; the run's description."""
    for path in files:
        run.log_artifact(path, "evaluation")
    metrics = {size_metric(row["size"]): row["accuracy"] for row in evaluation.resolution}
    metrics["test/min_input_size"] = evaluation.min_input_size
    dataset = module.dataset_cfg.name
    run.log_evaluation(metrics, split_dataset(dataset, "test", test.sha256()))
    run.describe(description(evaluation, module.network.name, dataset, len(test.labels)))


def description(evaluation: Evaluation, network: str, dataset: str, images: int) -> str:
    """What a run's page says first: the model, its test accuracy, how it fares by input size."""
    correct = round(evaluation.accuracy * images)
    text = f"{network} on {dataset}: test accuracy {evaluation.accuracy:.2%} ({correct}/{images})"
    if evaluation.resolution:
        worst = min(evaluation.resolution, key=lambda r: r["accuracy"])
        best = max(evaluation.resolution, key=lambda r: r["accuracy"])
        text += (
            f"; by input size {worst['accuracy']:.2%} ({worst['size']} px) to "
            f"{best['accuracy']:.2%} ({best['size']} px)"
        )
    return f"{text}; smallest input {evaluation.min_input_size} px."


def check_run_dir(run_dir: Path, checkpoint: str) -> None:
    """Fail, saying what to pass instead, unless `run_dir` is a training's output directory
    that holds `checkpoint`."""
    pass_one = "pass run_dir=DIR, the output directory of a training (outputs/DATE/TIME)"
    if not run_dir.is_dir():
        problem = "is a file" if run_dir.exists() else "does not exist"
        raise PipelineError(f"run_dir={run_dir} {problem}: {pass_one}")
    saved = sorted(path.name for path in (run_dir / "checkpoints").glob("*.ckpt"))
    if not saved and not (run_dir / RUN_FILE).is_file():
        raise PipelineError(
            f"run_dir={run_dir} is not a training's output (no {RUN_FILE}, no "
            f"checkpoints/*.ckpt): {pass_one}"
        )
    if not (run_dir / checkpoint).is_file():
        choice = f" (it has checkpoints/{', checkpoints/'.join(saved)})" if saved else ""
        raise PipelineError(
            f"no checkpoint {checkpoint} in run_dir={run_dir}: pass checkpoint=FILE, relative "
            f"to run_dir{choice}, or finish that training first "
            f"(`python -m pipeline.train train.resume={run_dir}`)"
        )


def check_out_dir(out_dir: Path) -> None:
    """Fail before evaluating, rather than after, where `out_dir` cannot be made or written."""
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"you may not write in {existing}"
    else:
        return
    raise PipelineError(
        f"out_dir={out_dir} cannot be written ({problem}): pass out_dir=DIR, a folder you can "
        "write (or leave it out: RUN_DIR/eval)"
    )


def load_checkpoint(path: Path) -> ImageClassifier:
    """The classifier a training's Lightning checkpoint holds (pipeline.training.module keeps
    it as `model`, built from the checkpoint's plain hyperparameters), read without Lightning."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = read_checkpoint(path, device)
    hparams = checkpoint["hyper_parameters"]
    model = build_classifier(**{key: hparams[key] for key in ("model", "dataset", "mean", "std")})
    weights = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    model.load_state_dict(weights)
    return model.to(device)


def evaluate_run(
    module: ImageClassifier,
    test: Split,
    cfg: EvaluationConfig,
    out_dir: Path,
    run: TrainingRun | None,
) -> Evaluation:
    """Evaluate `module` on `test`, write the reports to `out_dir` and log them to the
    training's MLflow `run` (when it has one)."""
    evaluation = evaluate(module, test, cfg.scales, cfg.batch_size)
    with staged_files(out_dir) as staging:
        label = run.name if run is not None else module.network.name
        files = write_reports(evaluation, module, test, staging, label)
        if run is not None:
            log_to_run(run, files, evaluation, module, test)
    sizes = ", ".join(f"{r['size']}px {r['accuracy']:.4f}" for r in evaluation.resolution)
    log.info(
        "test accuracy %.4f; by input size (%s takes %d px up): %s",
        evaluation.accuracy,
        module.network.name,
        evaluation.min_input_size,
        sizes,
    )
    return evaluation
