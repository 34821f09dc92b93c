"""Hydra sweeps (`python -m pipeline.train -m ...`) as one MLflow parent run per sweep.

`SweepTracking`, a Hydra callback registered in conf/config.yaml, opens the parent run before
the first trial starts (`open_sweep_run`) and leaves its id in `<sweep dir>/sweep_run.json`.
Each trial, in whatever process the launcher runs it, reads that file (`trial_tags`) and tags
its own run as a child. When the sweep ends the parent records the best trial (the settings the
sweep chose as `best.*` params, its `val/acc_best`), attaches `trials.jsonl` (every trial:
status, score or error, run id, overrides) and closes; a sweep that stops on a failure closes
its parent as FAILED. A trial whose ranks are SLURM tasks (`hydra/launcher=slurm`) runs the
whole Hydra job in each: only rank 0 records it. On a SLURM cluster without accounting, a trial
whose job was killed before it wrote its result (which submitit would wait for ever) ends the
sweep, recorded as FAILED (`SweepTracking.lost`). An Optuna search's parent run is its study's,
kept across resumes: its sweeper opens and records it (pipeline/search/run.py).

Before any of that, every trial's config is composed and validated (`validate_trials`): a typo
in any value of a sweep list fails the whole sweep at once, in one line naming it, with no
trial started, no sweep directory and no MLflow run.

MLflow is imported by the methods that talk to it: Hydra instantiates this callback for every
run, sweep or not, before the config is validated, and a typo should fail without waiting
for it.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import OPTUNA_SWEEPER, TrainJob, mask_password, validate
from pipeline.errors import ConfigError, PipelineError
from pipeline.search.study import PRUNED_AT
from pipeline.tracking.preflight import check_store

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep_run.json"
TRIALS_FILE = "trials.jsonl"  # one line per finished or failed trial
PARENT_TAG = "mlflow.parentRunId"
SCORE = "val/acc_best"  # what pipeline.train returns and the sweep maximises
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# Composing and validating one trial's config takes about 0.1 s. A sweep of up to this many
# trials has every trial checked; a bigger one (a product of hundreds) has each value checked
# once, in the first trial with only that value changed: a value bad on its own still stops
# the sweep, a pair bad only together (model.output=rbf with model.head=gap) its own trial.
FULL_CHECK_MAX_TRIALS = 32

T = TypeVar("T")


def retry(action: Callable[[], T], what: str, attempts: int = 6) -> T:
    """`action()`, retried with growing pauses: a store shared by concurrent processes (sqlite
    being created or migrated by another sweep, a busy server) fails transiently."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as err:
            if attempt == attempts - 1:
                raise
            pause = 0.5 * 2**attempt
            log.warning("%s failed (%s); retrying in %.1f s", what, err, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def global_rank() -> int:
    """This process's rank in its training: torchrun's RANK, SLURM's task number, else 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def trial_tags() -> dict[str, str]:
    """Tags for the run of the current sweep trial: its parent, job number and overrides."""
    if not in_multirun():
        return {}
    hydra = HydraConfig.get()
    tags = {
        "sweep.job_num": str(hydra.job.num),
        "sweep.overrides": json.dumps(list(hydra.overrides.task)),
    }
    sweep = sweep_record(Path(hydra.sweep.dir))
    if sweep:
        tags[PARENT_TAG] = sweep["run_id"]
    else:
        log.warning(
            "%s not found: this trial's run will not be grouped under a sweep",
            Path(hydra.sweep.dir) / SWEEP_FILE,
        )
    return tags


def trial_name() -> str | None:
    """The name of the current sweep trial's run: its sweep's (the parent run's) and its job
    number, e.g. sweep-digits-3f2a1c-4; None outside a sweep."""
    if not in_multirun():
        return None
    hydra = HydraConfig.get()
    return f"{sweep_record(Path(hydra.sweep.dir)).get('name', 'sweep')}-{hydra.job.num}"


def sweep_record(sweep_dir: Path) -> dict[str, str]:
    """The sweep's parent run (its id and name) as `sweep_dir`'s sweep_run.json has it; {}
    when the sweep has none."""
    sweep_file = sweep_dir / SWEEP_FILE
    return json.loads(sweep_file.read_text()) if sweep_file.is_file() else {}


def override_values(overrides: list[str]) -> dict[str, Any]:
    """{key: value} of Hydra overrides (sweeps as their sweep objects); unparsable ones as text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    values: dict[str, Any] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
            values[override.get_key_element().lstrip("+~")] = override.value()
        except Exception:
            key, _, value = text.partition("=")
            values[key.lstrip("+~")] = value
    return values


def chosen_settings(trial: list[str], sweep: list[str]) -> dict[str, str]:
    """A trial's settings that the sweep chose: its overrides not fixed on the command line."""
    fixed = override_values(sweep)
    return {
        key: str(value)
        for key, value in override_values(trial).items()
        if key not in fixed or fixed[key] != value
    }


def trials_to_check(alternatives: Sequence[Sequence[str]]) -> Iterator[list[str]]:
    """The trials (their overrides) whose configs to check, given each key's alternatives:
    every trial of a small sweep; of a big one, the first trial and each other value once."""
    if math.prod(map(len, alternatives)) <= FULL_CHECK_MAX_TRIALS:
        yield from map(list, itertools.product(*alternatives))
        return
    first = [values[0] for values in alternatives]
    yield first
    for index, values in enumerate(alternatives):
        for value in values[1:]:
            yield [*first[:index], value, *first[index + 1 :]]


def one_line(err: HydraException) -> str:
    """A config that failed to compose or validate, as one line: the message up to its details,
    the options Hydra offers, the cause's first line (which value failed to convert...)."""
    lines = str(err).splitlines()
    message = " ".join(itertools.takewhile(lambda line: line and not line[0].isspace(), lines))
    if isinstance(err, MissingConfigException) and err.options:
        message += f"; allowed: {', '.join(err.options)}"
    cause = str(err.__cause__ or "").split("\n", 1)[0]
    return f"{message} ({cause})" if cause and cause not in message else message


def validate_trials(config: DictConfig, alternatives: Sequence[Sequence[str]], what: str) -> None:
    """Compose and validate the configs of the trials of the sweep `config` (those that
    `trials_to_check` picks) before any starts, as its launcher will compose them: with its
    Hydra overrides (a search path) first. Raise a ConfigError, `what` first, naming the bad
    value and the trial's swept settings."""
    hydra_overrides = list(config.hydra.overrides.hydra)
    swept = [len(values) > 1 for values in alternatives]
    for overrides in trials_to_check(alternatives):
        try:
            composed = hydra.compose(config.hydra.job.config_name, hydra_overrides + overrides)
            validate(composed, TrainJob)
        except HydraException as err:  # composing (a missing option) or validating
            settings = " ".join(itertools.compress(overrides, swept))
            trial = f"the trial {settings}" if settings else "every trial"
            raise ConfigError(
                f"{what}: {one_line(err)}; in {trial}. No trial started: fix it and run again"
            ) from err


def sweep_alternatives(config: DictConfig) -> list[list[str]]:
    """Each key's overrides, one per trial value, as Hydra's basic sweeper expands them:
    hydra.sweeper.params, then the command line's (a key given in both: the command line's)."""
    params = config.hydra.sweeper.get("params") or {}
    texts = [*(f"{key}={value}" for key, value in params.items()), *config.hydra.overrides.task]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    alternatives: dict[str, list[str]] = {}
    for override in parser.parse_overrides(texts):
        key = override.get_key_element()
        if not override.is_sweep_override():
            alternatives[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            alternatives[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise ConfigError(
                f"sweep: {override.input_line} is not a list of values; allowed: a,b,c, "
                "choice(...), range(...), or interval(...) under hydra/sweeper=optuna"
            )
    return list(alternatives.values())


def open_sweep_run(
    config: DictConfig, tags: dict[str, str] | None = None, run_id: str | None = None
) -> str:
    """Create the sweep's parent MLflow run (or reopen `run_id`, a resumed search's, if the
    store still holds it) and leave its id in `<sweep dir>/sweep_run.json`, where each trial
    finds it; returns the id. Created before any trial, with the store and the experiment,
    so that trials started at once in several processes never race to create them."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.context.registry import resolve_tags

    from pipeline.tracking.store import experiment_id, open_store

    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri, name = config.mlflow.tracking_uri, config.mlflow.experiment
    tags = {
        "sweep.dir": str(sweep_dir.resolve()),
        "sweep.overrides": json.dumps(list(config.hydra.overrides.task)),
        "sweep.sweeper": config.hydra.sweeper._target_.rsplit(".", 1)[-1],
        "sweep.launcher": config.hydra.launcher._target_.rsplit(".", 1)[-1],
        **(tags or {}),
    }

    def open_parent() -> dict[str, str]:
        client = open_store(uri)
        experiment = experiment_id(client, name)
        if run_id is not None:
            try:
                reopened = client.get_run(run_id)
            except MlflowException:
                reopened = None
            if reopened is not None and reopened.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                for key, value in tags.items():
                    client.set_tag(run_id, key, value)
                return {
                    "run_id": run_id,
                    "experiment_id": reopened.info.experiment_id,
                    "name": reopened.info.run_name,
                }
        # with the tags MLflow's own start_run adds (the UI's Created by, Source, git commit)
        run = client.create_run(
            experiment, tags=resolve_tags(tags), run_name=f"sweep-{name}-{uuid.uuid4().hex[:6]}"
        )
        return {"run_id": run.info.run_id, "experiment_id": experiment, "name": run.info.run_name}

    parent = retry(open_parent, f"opening the sweep's MLflow run in {mask_password(uri)}")
    sweep_file = sweep_dir / SWEEP_FILE
    record = {**parent, "tracking_uri": mask_password(uri)}  # a file: never a password
    sweep_file.write_text(json.dumps(record, indent=2) + "\n")
    return parent["run_id"]


def append_trial(sweep_dir: Path, trial: dict[str, Any]) -> None:
    """Add a finished or failed trial to the sweep's `trials.jsonl`, in one write: trials that
    end at once in several processes append whole lines."""
    with (sweep_dir / TRIALS_FILE).open("a") as trials:
        trials.write(json.dumps(trial, default=str) + "\n")


class SweepTracking(Callback):
    """One MLflow parent run per Hydra multirun, holding one child run per trial."""

    def __init__(self) -> None:
        self.sweep_file: Path | None = None
        self.tracking_uri = ""  # the sweep's store, password included (never in a file)
        self.closed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.tracking_uri = config.mlflow.tracking_uri
        if config.hydra.launcher._target_ == SLURM_LAUNCHER:
            from pipeline.slurm import LostJobWatch, without_accounting

            if without_accounting():
                jobs = Path(config.hydra.launcher.submitit_folder).parent
                LostJobWatch(jobs, lambda lost: self.lost(lost, jobs)).start()
        # before the parent run and the sweep directory: a refused sweep leaves no trace
        if config.hydra.sweeper._target_ == OPTUNA_SWEEPER:
            return  # it checks its search space and store, and opens (or reopens) its parent run
        try:
            validate_trials(config, sweep_alternatives(config), "sweep")
            check_store(config.mlflow.tracking_uri, config.mlflow.timeout_s)
        except PipelineError as err:
            # Hydra turns a callback's exception into a warning and sweeps on: end here, as
            # the entry points end on a bad config (pipeline/cli.py)
            log.error("%s", err)
            sys.exit(1)
        parent = open_sweep_run(config)
        self.sweep_file = Path(config.hydra.sweep.dir) / SWEEP_FILE
        log.info("sweep %s: MLflow parent run %s", config.hydra.sweep.dir, parent)
        # a sweeper that raises (a failed trial under the basic sweeper) skips
        # on_multirun_end: close the parent as FAILED when the process ends
        atexit.register(self.close, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close("FINISHED")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Runs where the trial ran: appends the trial to `trials.jsonl` (its run, which the
        training ended as it ended: pipeline.tracking.runs.TrainingRun). A trial of several
        SLURM tasks runs the job, this included, in each: only rank 0 records it."""
        hydra = config.hydra
        if hydra.mode != RunMode.MULTIRUN or global_rank() != 0:
            return
        from pipeline.tracking.store import RUN_FILE, read_run

        output_dir = Path(hydra.runtime.output_dir)
        run = read_run(output_dir) if (output_dir / RUN_FILE).is_file() else None
        status = "COMPLETED" if job_return.status == JobStatus.COMPLETED else "FAILED"
        try:
            metrics, error = job_return.return_value, None
        except Exception as err:  # the trial's own exception, re-raised by Hydra's JobReturn
            metrics, error = {}, str(err)
        if PRUNED_AT in metrics:
            status = "PRUNED"
        trial = {
            "job": hydra.job.num,
            "status": status,
            "score": metrics.get(SCORE),
            "error": error,
            "run_id": run and run["run_id"],
            "output_dir": str(output_dir),
            "overrides": list(hydra.overrides.task),
        }
        append_trial(Path(hydra.sweep.dir), trial)

    def lost(self, jobs: dict[str, str], submitit_dir: Path) -> None:
        """Trials whose SLURM jobs ended without a result, which submitit would wait for ever
        (`pipeline.slurm.LostJobWatch`), once the others have ended: their runs end FAILED, the
        sweep records them, closes its parent as FAILED and ends, saying which.

        The one writer of a trial's status other than its TrainingRun: a job SLURM killed
        (cancelled, out of memory, its node gone) took its run's owner with it, and the sweep,
        which started the job, is left to say how it ended."""
        from pipeline.tracking.store import tracking_client

        client = tracking_client(self.tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        said = []
        for job, state in sorted(jobs.items()):
            error = (
                f"SLURM job {job} ended {state} without a result (cancelled, out of memory, "
                f"or its node failed; its logs: {submitit_dir / job})"
            )
            said.append(error)
            runs = client.search_runs(experiments, filter_string=f"tags.`slurm.job_id` = '{job}'")
            for run in runs:
                client.set_terminated(run.info.run_id, "FAILED")
            if self.sweep_file is None:
                continue
            tags = runs[0].data.tags if runs else {}
            trial = {
                "job": int(tags["sweep.job_num"]) if "sweep.job_num" in tags else None,
                "status": "FAILED",
                "score": None,
                "error": error,
                "run_id": runs[0].info.run_id if runs else None,
                "output_dir": tags.get("output_dir"),
                "overrides": json.loads(tags.get("sweep.overrides", "[]")),
            }
            append_trial(self.sweep_file.parent, trial)
        log.error("%s; the sweep ends", "; ".join(said))
        self.close("FAILED")
        logging.shutdown()
        os._exit(1)  # submitit would wait on in the main thread

    def close(self, status: str) -> None:
        """Record the best trial on the parent run and end it with `status`."""
        if self.closed or self.sweep_file is None:
            return
        self.closed = True
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        from pipeline.tracking.store import tracking_client

        parent = json.loads(self.sweep_file.read_text())
        client = tracking_client(self.tracking_uri)
        parent_id = parent["run_id"]
        # trials that sweep mlflow.experiment (or the dataset) log to other experiments
        experiments = [e.experiment_id for e in client.search_experiments()]
        children = client.search_runs(
            experiments, filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'"
        )
        done = [r for r in children if r.info.status == "FINISHED" and SCORE in r.data.metrics]
        trials_file = self.sweep_file.parent / TRIALS_FILE
        trials = (
            [json.loads(line) for line in trials_file.read_text().splitlines()]
            if trials_file.is_file()
            else []
        )
        tags = {
            "sweep.trials": str(len(trials)),
            "sweep.trials_failed": str(sum(t["status"] == "FAILED" for t in trials)),
        }
        if done:
            best = max(done, key=lambda r: r.data.metrics[SCORE])
            overrides = json.loads(best.data.tags.get("sweep.overrides", "[]"))
            sweep = json.loads(client.get_run(parent_id).data.tags["sweep.overrides"])
            client.log_metric(parent_id, SCORE, best.data.metrics[SCORE])
            for key, value in chosen_settings(overrides, sweep).items():
                client.log_param(parent_id, f"best.{key}", value)
            tags |= {"best_run_id": best.info.run_id, "best.overrides": json.dumps(overrides)}
            # the description, on the run's page first: the best trial as a link to its run
            link = f"#/experiments/{best.info.experiment_id}/runs/{best.info.run_id}"
            tags[MLFLOW_RUN_NOTE] = (
                f"{tags['sweep.trials']} trials, {tags['sweep.trials_failed']} failed; best: "
                f"[{best.info.run_name}]({link}), {SCORE} {best.data.metrics[SCORE]:.4f} with "
                f"{' '.join(overrides)}"
            )
            log.info(
                "sweep best: %s = %.4f with %s (run %s)",
                SCORE,
                best.data.metrics[SCORE],
                " ".join(overrides),
                best.info.run_id,
            )
        for key, value in tags.items():
            client.set_tag(parent_id, key, value)
        for name in ("multirun.yaml", TRIALS_FILE):
            if (self.sweep_file.parent / name).is_file():
                client.log_artifact(parent_id, str(self.sweep_file.parent / name))
        client.set_terminated(parent_id, status)
