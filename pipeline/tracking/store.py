"""The tracking store: a client for it, and `run.json`, which points a training's output
directory at its MLflow run (for `evaluate`, a resumed training and a sweep's records).

Apart from Lightning, so that `evaluate` and Hydra's sweep callback use MLflow without it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import mask_password
from pipeline.errors import PipelineError

RUN_FILE = "run.json"
# creating a sqlite store's tables takes seconds: a process holding its lock for longer is stuck
STORE_LOCK_S = 120


def read_run(output_dir: Path) -> dict[str, str]:
    """run.json: the run id, and the store's URI (password masked: it comes back from the
    MLFLOW_TRACKING_URI environment variable when that names the same store)."""
    run = json.loads((output_dir / RUN_FILE).read_text())
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured and mask_password(configured) == run["tracking_uri"]:
        run["tracking_uri"] = configured
    return run


def tracking_client(tracking_uri: str) -> MlflowClient:
    """A client of the store at `tracking_uri`: every client and run of the project opens the
    store here, and here alone a user and password in the URI are resolved.

    MLflow takes a server's credentials only from its MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD environment variables (or ~/.mlflow/credentials): MlflowClient and
    mlflow.set_tracking_uri take none, and a URI that kept them would show them in every URL
    MLflow prints or stores. So this sets those two variables, for this process and the DDP
    ranks, trials and SLURM jobs it starts, and the client gets the URI without them.
    """
    parts = urlsplit(tracking_uri)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return MlflowClient(without_credentials(tracking_uri))


def without_credentials(tracking_uri: str) -> str:
    """`tracking_uri` less its user and password, if it names them: the URI MLflow may print."""
    parts = urlsplit(tracking_uri)
    if parts.password is None:
        return tracking_uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def open_store(tracking_uri: str) -> MlflowClient:
    """A client of the tracking store, which it creates if new. Processes that start together
    take turns at a sqlite file: two creating its tables at once leave a broken schema."""
    database = sqlite_database(tracking_uri)
    if database:
        database.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{database}.lock", timeout=STORE_LOCK_S) if database else None
    try:
        with lock or contextlib.nullcontext():
            client = tracking_client(tracking_uri)
            client.search_experiments(max_results=1)
    except Timeout as err:
        raise PipelineError(
            f"{lock.lock_file} stayed locked for {STORE_LOCK_S} s: another process is stuck "
            "creating that MLflow store; stop it, or use another mlflow.tracking_uri"
        ) from err
    return client


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a sqlite store (None for other stores, and for sqlite in memory)."""
    path = tracking_uri.removeprefix("sqlite:///")
    return Path(path) if path != tracking_uri else None


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database of a sqlite store (MLflow
    would use ./mlruns of whichever process creates the experiment, so a store on a shared disk
    would point at one machine's working directory); a server's own choice otherwise (None)."""
    database = sqlite_database(tracking_uri)
    return (database.parent.resolve() / experiment).as_uri() if database else None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (also when another process just did)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location(client.tracking_uri, name))
    except MlflowException:  # created meanwhile by a concurrent process
        return client.get_experiment_by_name(name).experiment_id
