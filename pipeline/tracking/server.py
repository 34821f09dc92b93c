"""The team's tracking server: `mlflow server` on PostgreSQL, artifacts proxied over HTTP.

Clients upload and download artifacts through the server (`--artifacts-destination`), so a
node needs only `MLFLOW_TRACKING_URI=http://HOST:PORT`, no shared filesystem. The database is
a team's own (`backend_store_uri=postgresql://...`) or a PostgreSQL cluster the project runs
from Debian's `postgresql` package, its data in DATA_DIR/postgres so that it survives restarts;
that cluster also holds a database for Optuna's studies, whose address the server prints
(`export OPTUNA_STORAGE=...`) for searches shared by every trial and node.
Database passwords travel in a libpq password file (PGPASSFILE), never on a command line.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import ServerJob, mask_password
from pipeline.errors import PipelineError

DATABASE = "mlflow"  # role and database of the project-run cluster
STUDIES = "optuna"  # its database for Optuna studies (pipeline/search/): tables of their own
# seconds a team's database may take to accept a connection before the server gives up on it
CONNECT_TIMEOUT_S = 10
# what to do when the server cannot listen where it is told to
LISTEN_ADVICE = {
    errno.EADDRINUSE: "stop what listens there, or pass {key}=A_FREE_PORT",
    errno.EACCES: "ports below 1024 need root: pass {key}=1024 or above",
}


def postgres_bin() -> Path:
    """The directory of PostgreSQL's server programs (Debian: /usr/lib/postgresql/N/bin)."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3])
    )
    found = debian[-1] if debian else shutil.which("pg_ctl")
    if not found:
        raise PipelineError(
            "PostgreSQL is not installed: `make server` installs Debian's postgresql (as root), "
            "or install it with your package manager, or pass "
            "backend_store_uri=postgresql://USER:PASSWORD@HOST:PORT/DB for your team's database"
        )
    return Path(found).parent


class LocalPostgres:
    """A PostgreSQL cluster in `directory`, on 127.0.0.1:`port`, with one password-protected
    role and database. Created on first start; its data outlives every stop."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory.resolve()
        self.data = self.directory / "postgres"
        self.passfile = self.directory / "pgpass"
        self.port = port
        # postgres refuses to run as root: then it runs as Debian's `postgres` system user
        self.user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def database_uri(self, name: str) -> str:
        """Without the password, which libpq reads from `passfile`."""
        return f"postgresql+psycopg://{DATABASE}@127.0.0.1:{self.port}/{name}"

    @property
    def uri(self) -> str:
        return self.database_uri(DATABASE)

    def run(self, program: str, *args: str) -> None:
        owner = {"user": self.user.pw_uid, "group": self.user.pw_gid} if self.user else {}
        command = [str(postgres_bin() / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, **owner)
        if result.returncode != 0:
            raise PipelineError(f"{program} failed: {result.stderr.strip() or result.stdout}")

    def start(self) -> str:
        """Start the cluster (creating it first if new); returns its URI."""
        if not (self.data / "PG_VERSION").is_file():
            self.create()
        self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.data / "log"),
                 "-o", f"-h 127.0.0.1 -p {self.port} -k {self.data}", "start")  # fmt: skip
        self.create_database(STUDIES)  # also in a cluster created before studies had one
        return self.uri

    def create_database(self, name: str) -> None:
        """Create database `name`, owned by the project's role, unless it exists."""
        env = {**os.environ, "PGPASSFILE": str(self.passfile)}
        createdb = [str(postgres_bin() / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        result = subprocess.run(
            [*createdb, "-U", DATABASE, name], env=env, capture_output=True, text=True
        )
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise PipelineError(f"createdb {name} failed: {result.stderr.strip()}")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def create(self) -> None:
        password = secrets.token_urlsafe(24)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{DATABASE}:{password}\n")
        self.passfile.chmod(0o600)
        self.data.mkdir(mode=0o700)
        pwfile = self.directory / "initial-password"
        pwfile.write_text(password + "\n")
        if self.user:
            for path in (self.data, pwfile):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.run("initdb", "-D", str(self.data), "-U", DATABASE, f"--pwfile={pwfile}",
                 "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C")  # fmt: skip
        pwfile.unlink()
        self.start()
        try:
            self.create_database(DATABASE)
        finally:
            self.stop()


def without_password(uri: str, passfile: Path) -> str:
    """`uri` without its password, which goes to `passfile` (libpq's format) instead."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host, port = parts.hostname or "localhost", parts.port or 5432
    database = parts.path.lstrip("/") or "*"
    passfile.parent.mkdir(parents=True, exist_ok=True)
    passfile.write_text(f"{host}:{port}:{database}:{parts.username}:{parts.password}\n")
    passfile.chmod(0o600)
    netloc = parts.netloc.replace(f":{parts.password}@", "@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def database(cfg: ServerJob) -> Iterator[tuple[str, Path, str | None]]:
    """(backend store URI without password, password file, the studies' database URI or None
    for a team's own database) for the server's lifetime."""
    directory = Path(cfg.data_dir)
    if cfg.backend_store_uri is not None:
        passfile = directory / "team-pgpass"
        yield without_password(cfg.backend_store_uri, passfile), passfile, None
        return
    local = LocalPostgres(directory, cfg.database_port)
    uri = local.start()
    try:
        yield uri, local.passfile, local.database_uri(STUDIES)
    finally:
        local.stop()


def wait_healthy(
    url: str, server: subprocess.Popen, timeout: float = 180, path: str = "/health"
) -> None:
    """Wait until the MLflow server process `server` answers `url` + `path` (a model server:
    /ping); fail if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise PipelineError(f"mlflow server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise PipelineError(f"mlflow server did not answer {url}{path} within {timeout:.0f} s")


def check_listenable(host: str, port: int, key: str) -> None:
    """Fail at once if nothing can listen on `host`:`port` (taken, or not this machine's): the
    server would only fail after starting its database, in a traceback of its own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as err:
        advice = LISTEN_ADVICE.get(
            err.errno or 0, "pass host=an address of this machine (0.0.0.0: all)"
        )
        raise PipelineError(
            f"cannot listen on {host}:{port} ({err.strerror}): {advice.format(key=key)}"
        ) from err


def check_reachable(uri: str) -> None:
    """Fail within CONNECT_TIMEOUT_S if the team's database at `uri` refuses a connection:
    `mlflow server` would retry for minutes, then fail in a traceback."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S}
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
        with engine.connect():
            pass
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as err:
        reason = str(getattr(err, "orig", None) or err).splitlines()[0]
        raise PipelineError(
            f"backend_store_uri={mask_password(uri)} cannot be reached ({reason}): start that "
            "database, or correct the host, port, user or password in backend_store_uri"
        ) from err


def check_can_serve(cfg: ServerJob) -> None:
    """Refuse, in one line and before anything is written, what the server cannot run on."""
    data_dir = Path(cfg.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise PipelineError(
            f"data_dir={cfg.data_dir} is a file, not a folder: pass data_dir=A_FOLDER (created "
            "if missing) for the database, artifacts and password files, or move that file"
        )
    if cfg.backend_store_uri is not None:  # the team's database, whatever the port
        check_reachable(cfg.backend_store_uri)
    check_listenable(cfg.host, cfg.port, "port")
    if cfg.backend_store_uri is None:  # the project's own: installed, its port free
        postgres_bin()
        check_listenable("127.0.0.1", cfg.database_port, "database_port")


def serve(cfg: ServerJob) -> None:
    """Run the server until interrupted (Ctrl-C or SIGTERM), then stop what it started."""
    check_can_serve(cfg)
    artifacts = Path(cfg.data_dir).resolve() / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    with database(cfg) as (store_uri, passfile, studies_uri):
        env = {
            **os.environ,
            "PGPASSFILE": str(passfile.resolve()),
            # MLflow's server-side job runner: not used here, and several processes more
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", store_uri,
            "--artifacts-destination", str(artifacts),
            "--host", cfg.host,
            "--port", str(cfg.port),
            "--workers", str(cfg.workers),
        ]  # fmt: skip
        server = subprocess.Popen(command, env=env, start_new_session=True)
        url = f"http://{'127.0.0.1' if cfg.host == '0.0.0.0' else cfg.host}:{cfg.port}"
        try:
            wait_healthy(url, server)
            print(f"MLflow tracking server on {mask_password(store_uri)}; artifacts in {artifacts}")
            if studies_uri:  # Optuna's searches share their studies there (libpq: PGPASSFILE)
                print(f"export OPTUNA_STORAGE={studies_uri} PGPASSFILE={passfile.resolve()}")
            print(f"export MLFLOW_TRACKING_URI={url}", flush=True)
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)  # uvicorn and its workers
                server.wait(timeout=60)
