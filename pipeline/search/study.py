"""The study every process of a search shares: where it lives, and a trial's side of it.

The sweeper creates or resumes the study, asks for trials and launches them; each trial, in
whatever process or node the launcher runs it, opens the same study from its storage
(`StudyTrial`, handed its number by the sweeper as `search.trial`), reports every epoch, is
told by the pruner when to stop, and tells its own result: a sweep process that dies loses no
trial that ended. A running trial records a heartbeat; one whose heartbeats stop (its process
was killed) is failed by the next sweep process to look, and asked again with its parameters.

Optuna is imported where it is used: Hydra imports the sweeper for every run, sweep or not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.config import mask_password
from pipeline.errors import SearchError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# a trial's user attributes in the study
RUN_ATTR = "mlflow_run_id"  # its MLflow run, once it has one
ERROR_ATTR = "error"  # why it failed, when it failed on its own (it ended: it counts)
SURPLUS_ATTR = "surplus"  # asked beyond n_trials by one of several sweep processes: never ran
# the study's: its MLflow parent run (one study, one parent run, however often resumed)
PARENT_ATTR = "mlflow_parent_run_id"
# in the metrics a pruned training returns: the epoch it stopped after
PRUNED_AT = "pruned_at_epoch"
STALE_HEARTBEATS = 4  # heartbeats missed before a running trial counts as dead


def default_storage(storage: str | None, tracking_uri: str) -> str:
    """The study's storage URL: `storage`, or sqlite beside a sqlite MLflow store."""
    from pipeline.tracking.store import sqlite_database

    if storage:
        return storage
    database = sqlite_database(tracking_uri)
    if database is None:
        raise SearchError(
            f"hydra.sweeper.storage: the MLflow store {mask_password(tracking_uri)} is not a "
            "sqlite file, so the study needs a database that every trial reaches: export "
            "OPTUNA_STORAGE=postgresql://... (`make server` prints the team server's) or pass "
            "hydra.sweeper.storage=..."
        )
    return f"sqlite:///{database.parent / 'optuna.db'}"


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and warns that heartbeats are experimental: the sweeper
    logs what matters itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # heartbeats with ask-and-tell, not Study.optimize, are this search's own design
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def open_storage(
    url: str, heartbeat_s: int, on_stale: Callable[..., None] | None = None
) -> optuna.storages.RDBStorage:
    """Optuna's storage at `url`, its tables created if new; a URL that cannot be opened is a
    SearchError naming it (password masked)."""
    import optuna
    from filelock import FileLock

    from pipeline.tracking.store import sqlite_database

    quiet_optuna()
    database = sqlite_database(url)
    try:
        if database:
            database.parent.mkdir(parents=True, exist_ok=True)
        # two processes creating a new sqlite file's tables at once leave a broken schema
        with FileLock(f"{database}.lock") if database else contextlib.nullcontext():
            return optuna.storages.RDBStorage(
                url,
                # sqlite: writers (heartbeats, reports) wait for each other instead of failing
                engine_kwargs={"connect_args": {"timeout": 60}} if database else None,
                heartbeat_interval=heartbeat_s,
                grace_period=heartbeat_s * STALE_HEARTBEATS,
                heartbeat_stale_trial_callback=on_stale,
            )
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            reason = reason.replace(password, "***")
        raise SearchError(
            f"hydra.sweeper.storage={mask_password(url)} cannot be opened: {reason}"
        ) from err


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` (what heartbeats and `optuna.Trial` take)."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial is one of the study's n_trials: it ended (finished, pruned, or failed on
    its own), runs, or waits to be asked. One failed because its process died does not: its
    queued copy does. Nor does a surplus one, which never ran."""
    from optuna.trial import TrialState

    return trial.state != TrialState.FAIL or ERROR_ATTR in trial.user_attrs


@contextlib.contextmanager
def heartbeats(storage: Any, trial_ids: Collection[int], every_s: float) -> Iterator[None]:
    """Record the heartbeats of the trials in `trial_ids` (which may change meanwhile) every
    `every_s` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            for number in list(trial_ids):
                try:
                    storage.record_heartbeat(number)
                except Exception as err:  # a busy or restarting database: the next beat
                    log.warning("heartbeat of trial id %s not recorded: %s", number, err)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


_OPENED: dict[tuple[int, str, str, int], tuple[Any, Any, Any, int]] = {}


@dataclass(frozen=True)
class StudyTrial:
    """A training's side of its study trial: plain data, so that DDP ranks and SLURM tasks get
    it with the config; each process opens the study for itself."""

    storage: str
    study_name: str
    number: int
    monitor: str  # reported every epoch
    objective: str  # the returned metric the trial is scored by
    heartbeat_s: int
    pruner: Mapping[str, Any] = field(default_factory=dict)  # `_target_` config

    def opened(self) -> tuple[optuna.storages.RDBStorage, optuna.Study, optuna.Trial, int]:
        """(storage, study, trial, its storage id) of this process: a forked DDP rank opens its
        own connections."""
        key = (os.getpid(), self.storage, self.study_name, self.number)
        if key not in _OPENED:
            import optuna
            from hydra.utils import instantiate

            storage = open_storage(self.storage, self.heartbeat_s)
            pruner = instantiate(dict(self.pruner)) if self.pruner else None
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
            stored_id = trial_id(storage, self.study_name, self.number)
            _OPENED[key] = (storage, study, optuna.Trial(study, stored_id), stored_id)
        return _OPENED[key]

    def trial(self) -> optuna.Trial:
        return self.opened()[2]

    def report(self, value: float, epoch: int) -> bool:
        """Report `monitor` after `epoch`; whether the pruner stops the trial."""
        trial = self.trial()
        trial.report(value, epoch)
        return trial.should_prune()

    def record_run(self, run_id: str) -> None:
        self.trial().set_user_attr(RUN_ATTR, run_id)

    def tags(self) -> dict[str, str]:
        """For the trial's MLflow run."""
        return {"optuna.study": self.study_name, "optuna.trial": str(self.number)}

    def run(self, training: Callable[[], dict[str, float]], output_dir: Path) -> dict[str, float]:
        """Run `training` as this trial: heartbeats while it runs, then its result told to the
        study (finished, pruned, or failed with its error) and tagged on its MLflow run."""
        from optuna.trial import TrialState

        storage, study, _, stored_id = self.opened()
        state = storage.get_trial(stored_id).state
        if state != TrialState.RUNNING:
            raise SearchError(
                f"trial {self.number} of study {self.study_name} is {state.name}, not running: "
                "its heartbeats stopped (queued for longer than the sweep waits?); it is asked "
                "again"
            )
        with heartbeats(storage, [stored_id], self.heartbeat_s):
            try:
                metrics = training()
            except Exception as err:
                self.fail(str(err) or type(err).__name__, output_dir)
                raise
        if PRUNED_AT in metrics:
            told = study.tell(self.number, state=TrialState.PRUNED, skip_if_finished=True)
        elif self.objective not in metrics:
            named = ", ".join(sorted(metrics))
            error = f"hydra.sweeper.objective={self.objective} is not a metric it returns: {named}"
            self.fail(error, output_dir)
            raise SearchError(error)
        else:
            told = study.tell(self.number, metrics[self.objective], skip_if_finished=True)
        tag_run(output_dir, told.state.name)
        return metrics

    def fail(self, error: str, output_dir: Path) -> None:
        from optuna.trial import TrialState

        _, study, trial, _ = self.opened()
        trial.set_user_attr(ERROR_ATTR, error[:1000])
        study.tell(self.number, state=TrialState.FAIL, skip_if_finished=True)
        tag_run(output_dir, "FAIL")


def tag_run(output_dir: Path, state: str) -> None:
    """Tag the MLflow run of the training in `output_dir` (if it got one) with its trial state."""
    from pipeline.tracking.store import RUN_FILE, read_run, tracking_client

    if (output_dir / RUN_FILE).is_file():
        run = read_run(output_dir)
        tracking_client(run["tracking_uri"]).set_tag(run["run_id"], "optuna.state", state)
