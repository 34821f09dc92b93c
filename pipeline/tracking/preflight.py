"""Is the tracking store usable? Asked once, before anything trains, and answered in seconds.

MLflow retries an unreachable server for minutes and a sqlite file it cannot create fails deep
in SQLAlchemy (or, behind the lock that guards its creation, never); a training that starts
anyway has done its work for nothing. Once the store answered, MLflow's own retries ride out a
short outage of a long training. Standard library only: this runs before torch is imported.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import mask_password
from pipeline.errors import PipelineError

SQLITE_HEADER = b"SQLite format 3\x00"


def check_store(tracking_uri: str, timeout_s: float) -> None:
    """Raise a PipelineError, naming the store (password masked) and what to check, unless a
    sqlite store's file can be created or opened, or a server answers within `timeout_s`."""
    scheme = urlsplit(tracking_uri).scheme
    if scheme == "sqlite":
        check_sqlite(tracking_uri)
    elif scheme in ("http", "https"):
        check_server(tracking_uri, timeout_s)


def check_sqlite(tracking_uri: str) -> None:
    path = tracking_uri.removeprefix("sqlite:///")
    if path in ("", ":memory:"):
        return
    database = Path(path)
    where = f"mlflow.tracking_uri={tracking_uri}"
    if database.is_dir():
        raise PipelineError(
            f"{where}: {database} is a folder; name a database file in it, "
            f"e.g. sqlite:///{database / 'mlflow.db'}"
        )
    blocking = next((p for p in database.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise PipelineError(f"{where}: {blocking} is a file, not a folder; choose another path")
    if database.is_file():
        with database.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
        if header and header != SQLITE_HEADER:
            raise PipelineError(
                f"{where}: {database} is not a sqlite database; name a new or an MLflow file"
            )
        return
    try:  # what MLflow and its lock (tracking/store.py) will do first
        database.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{database}.lock").touch()
    except OSError as err:
        raise PipelineError(
            f"{where}: cannot create files in {database.parent} ({err.strerror}); "
            "choose a folder you can write"
        ) from err


def check_server(tracking_uri: str, timeout_s: float) -> None:
    """Ask the server's /health until it answers or `timeout_s` passed (a server that is just
    starting gets those seconds to come up)."""
    parts = urlsplit(tracking_uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # /health needs no credentials
    health = urlunsplit(parts._replace(netloc=netloc, path=parts.path.rstrip("/") + "/health"))
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(health, timeout=max(left, 0.1)) as response:
                if response.status == 200:
                    return
                problem = f"/health answered {response.status}"
        except urllib.error.HTTPError as err:  # a server, and not MLflow's: no use waiting
            problem, deadline = f"/health answered {err.code}: is it an MLflow server?", 0
        except (urllib.error.URLError, OSError) as err:
            problem = str(getattr(err, "reason", err))
        if time.monotonic() + 0.5 >= deadline:
            raise PipelineError(
                f"no MLflow tracking server answers at {mask_password(tracking_uri)} within "
                f"{timeout_s:g} s ({problem}): start it (`make server`) or fix "
                "mlflow.tracking_uri / MLFLOW_TRACKING_URI; mlflow.timeout_s waits longer"
            )
        time.sleep(0.5)
