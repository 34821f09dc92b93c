"""The results table of the DVC runs: `python -m pipeline.report` (the end of `make demo`).

Reads params.yaml's runs, each run's reports/NAME/metrics.json and resolution.csv (written by
the evaluate stage) and runs/NAME/history.csv (training time), and prints one row per
evaluated run. Per dataset, it draws every run's accuracy-versus-size curve into one figure,
reports/resolution-DATASET.png (`dvc plots show` draws the same from dvc.yaml's top-level
plots), and logs it to each of those runs in MLflow, so each run shows how its head compares.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.evaluation.figures import Curve, resolution_figure
from pipeline.tracking.store import RUN_FILE, read_run, tracking_client


def load_rows(root: Path) -> list[dict]:
    runs = OmegaConf.to_container(OmegaConf.load(root / "params.yaml").runs)
    rows = []
    for name, run in runs.items():
        metrics_file = root / "reports" / name / "metrics.json"
        if not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text())
        with (root / "runs" / name / "history.csv").open() as handle:
            history = list(csv.DictReader(handle))
        with (root / "reports" / name / "resolution.csv").open() as handle:
            resolution = [
                {"size": float(row["size"]), "accuracy": float(row["accuracy"])}
                for row in csv.DictReader(handle)
            ]
        rows.append(
            {
                "run": name,
                "dataset": run["dataset"],
                "model": run["model"],
                "params": metrics["params"],
                "test_acc": metrics["test_acc"],
                "at_size": metrics["test_acc_at_size"],
                "curve": Curve(name, resolution, metrics["min_input_size"], metrics["fixed_size"]),
                "epochs": len(history),
                "seconds": float(history[-1]["elapsed_s"]),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    sizes = sorted({int(size) for row in rows for size in row["at_size"]})
    header = ["run", "params", "test acc", *(f"@{size}px" for size in sizes), "epochs", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        at = [row["at_size"].get(str(size)) for size in sizes]
        cells = [
            row["run"],
            f"{row['params']:,}",
            f"{row['test_acc']:.4f}",
            *("-" if value is None else f"{value:.4f}" for value in at),
            str(row["epochs"]),
            f"{row['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dataset_figure(root: Path, rows: list[dict]) -> Path:
    """One dataset's runs overlaid: written to reports/ and logged to each run in MLflow."""
    dataset = rows[0]["dataset"]
    figure = resolution_figure(
        [row["curve"] for row in rows], f"{dataset}: test accuracy versus input size"
    )
    path = root / "reports" / f"resolution-{dataset}.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    for row in rows:
        run_dir = root / "runs" / row["run"]
        if (run_dir / RUN_FILE).is_file():
            run = read_run(run_dir)
            tracking_client(run["tracking_uri"]).log_figure(
                run["run_id"], figure, f"evaluation/{path.name}"
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = load_rows(args.root)
    if not rows:
        raise SystemExit("no evaluated runs yet: dvc repro --glob 'evaluate@digits-*'")
    print(table(rows))
    print()
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        path = dataset_figure(args.root, [row for row in rows if row["dataset"] == dataset])
        print(f"accuracy versus input size, {dataset} runs: {path.relative_to(args.root)}")
    print("MLflow UI on these runs: make ui")


if __name__ == "__main__":
    main()
