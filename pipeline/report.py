"""The results table of the DVC runs: `python -m pipeline.report` (the end of `make demo`).

Reads params.yaml's runs, each run's reports/NAME/metrics.json (written by the evaluate
stage) and runs/NAME/history.csv (training time), prints one row per evaluated run, and
draws every run's accuracy-versus-resolution curve into reports/resolution.png.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.evaluation.figures import resolution_figure


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
            resolution = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        rows.append(
            {
                "run": name,
                "model": run["model"],
                "params": metrics["params"],
                "test_acc": metrics["test_acc"],
                "at_size": metrics["test_acc_at_size"],
                "resolution": resolution,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = load_rows(args.root)
    if not rows:
        raise SystemExit("no evaluated runs yet: dvc repro --glob 'evaluate@digits-*'")
    print(table(rows))
    figure = resolution_figure({row["run"]: row["resolution"] for row in rows})
    figure.savefig(args.root / "reports" / "resolution.png", dpi=110, bbox_inches="tight")
    print("\naccuracy versus input size, all runs: reports/resolution.png")
    print("MLflow UI on these runs: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")


if __name__ == "__main__":
    main()
