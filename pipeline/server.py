"""The team's MLflow tracking server, on PostgreSQL, until Ctrl-C:

    python -m pipeline.server                       # the project's own PostgreSQL, in .server/
    python -m pipeline.server host=0.0.0.0 backend_store_uri=postgresql://u:PW@db:5432/mlflow

It prints the line every node then runs: export MLFLOW_TRACKING_URI=http://HOST:PORT
"""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.cli import hydra_entry
from pipeline.config import ServerJob, validate
from pipeline.tracking.server import serve


@hydra_entry("server")
def main(cfg: DictConfig) -> None:
    serve(validate(cfg, ServerJob))


if __name__ == "__main__":
    main()
