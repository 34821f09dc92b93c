"""One run of a search command: resume or create the study, ask, launch and settle trials until
the study holds n_trials, then record it on its MLflow parent run."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import OptunaSweeperConfig, mask_password
from pipeline.errors import SearchError
from pipeline.search.space import SearchSpace
from pipeline.search.study import (
    ERROR_ATTR,
    PARENT_ATTR,
    RUN_ATTR,
    SURPLUS_ATTR,
    counts_toward_budget,
    default_storage,
    heartbeats,
    open_storage,
    trial_id,
)
from pipeline.search.sweeper import launcher_parallelism, placement, study_name
from pipeline.tracking.preflight import check_store
from pipeline.tracking.store import tracking_client
from pipeline.tracking.sweeps import TRIALS_FILE, open_sweep_run

log = logging.getLogger(__name__)

Launch = Callable[[Sequence[Sequence[str]], int], Sequence[JobReturn]]
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class Search:
    """The study `config` and `options` name, searched over `space` with `launch`."""

    def __init__(
        self, config: DictConfig, options: OptunaSweeperConfig, space: SearchSpace, launch: Launch
    ) -> None:
        self.config, self.options, self.space, self.launch = config, options, space, launch
        self.batch, self.slots = placement(config, options)
        # jobs in processes of this machine: trials are launched from threads, a slot each
        self.concurrent = (launcher_parallelism(config.hydra.launcher) or 1) > 1
        self.url = default_storage(options.storage, config.mlflow.tracking_uri)
        check_store(config.mlflow.tracking_uri, config.mlflow.timeout_s)  # before any record
        self.name = study_name(
            options.study_name, config.mlflow.experiment, config.hydra.runtime.choices
        )
        self.storage = open_storage(self.url, options.heartbeat_s, on_stale=self.ask_again)
        self.sampler = self.make_sampler(seed_offset=0)
        self.pruner = instantiate(options.pruner)
        self.study, created = self.open_study()
        if not created:
            # resumed or joined: a seeded sampler started over would ask what was asked before
            offset = len(self.study.get_trials(deepcopy=False)) + os.getpid()
            self.study.sampler = self.sampler = self.make_sampler(offset)
        self.parent = self.open_parent(created)
        self.next_job = 0
        # launched trials by their job (a trial, or one batch), with their slots
        self.running: dict[Future, list[tuple[optuna.Trial, int]]] = {}
        # the storage ids of the trials in flight, by number: this process beats for them while
        # they wait (a SLURM queue) or run, their own processes while they run
        self.in_flight: dict[int, int] = {}

    def make_sampler(self, seed_offset: int) -> optuna.samplers.BaseSampler:
        config = self.options.sampler
        args: dict[str, Any] = {}
        if config["_target_"].endswith("GridSampler"):
            args["search_space"] = self.space.grid()
        if seed_offset and config.get("seed") is not None:
            args["seed"] = config["seed"] + seed_offset
        return instantiate(config, **args)

    def open_study(self) -> tuple[optuna.Study, bool]:
        """(the study, whether this process created it)."""
        common = {"study_name": self.name, "storage": self.storage}
        try:
            study = optuna.create_study(
                **common, sampler=self.sampler, pruner=self.pruner, direction=self.options.direction
            )
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(**common, sampler=self.sampler, pruner=self.pruner)
        if study.direction.name.lower() != self.options.direction:
            raise SearchError(
                f"study {self.name} in {mask_password(self.url)} is to "
                f"{study.direction.name.lower()}, hydra.sweeper.direction={self.options.direction}:"
                " pass another hydra.sweeper.study_name"
            )
        return study, False

    def open_parent(self, created: bool) -> str:
        """The study's MLflow parent run: created with the study, reopened when it resumes."""
        known = self.study.user_attrs.get(PARENT_ATTR)
        deadline = time.monotonic() + 60
        while known is None and not created and time.monotonic() < deadline:
            time.sleep(0.5)  # the process that created the study is creating its parent run
            known = self.study.user_attrs.get(PARENT_ATTR)
        tags = {
            "optuna.study": self.name,
            "optuna.storage": mask_password(self.url),
            "optuna.sampler": type(self.sampler).__name__,
            "optuna.pruner": type(self.pruner).__name__,
            "optuna.direction": self.options.direction,
            "optuna.objective": self.options.objective,
        }
        parent = open_sweep_run(self.config, tags, known)
        if parent != known:
            self.study.set_user_attr(PARENT_ATTR, parent)
        return parent

    def run(self) -> None:
        sweep_dir = Path(self.config.hydra.sweep.dir)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's own sweeper does
        ended = [t for t in self.study.get_trials(deepcopy=False) if t.state in ENDED]
        log.info(
            "study %s in %s: %d of %d trials ended; MLflow parent run %s",
            self.name, mask_password(self.url), len(ended), self.options.n_trials, self.parent,
        )  # fmt: skip
        status = "FAILED"
        try:
            self.search()
            status = "FINISHED"
        finally:
            self.record(status)

    def search(self) -> None:
        """Keep up to `batch` trials running until the study holds n_trials. A launcher that
        runs its jobs in processes of this machine (joblib) gets each trial alone, from a
        thread per slot, so that a slot whose trial ended (pruned, say) takes the next one at
        once; others (basic: in this process; SLURM: one job array) get each batch whole."""
        pool = ThreadPoolExecutor(self.batch, "trial") if self.concurrent else InThisThread()
        with pool, heartbeats(self.storage, self.in_flight.values(), self.options.heartbeat_s):
            while True:
                optuna.storages.fail_stale_trials(self.study)
                budget = [
                    t for t in self.study.get_trials(deepcopy=False) if counts_toward_budget(t)
                ]
                queued = sum(t.state == TrialState.WAITING for t in budget)
                self.launch_into_free_slots(pool, self.options.n_trials - len(budget) + queued)
                if self.running:
                    self.settle_ended()
                elif not any(t.state == TrialState.RUNNING for t in budget):
                    return
                else:  # other processes' trials, or dead ones until their heartbeats go stale
                    time.sleep(self.options.heartbeat_s)

    def launch_into_free_slots(self, pool: Executor, left: int) -> None:
        """Ask for up to `left` trials, one per free slot, and launch them."""
        busy = {slot for group in self.running.values() for _, slot in group}
        free = [slot for slot in range(self.batch) if slot not in busy][: max(left, 0)]
        asked = list(zip(self.ask(len(free)), free, strict=False)) if free else []
        groups = [[pair] for pair in asked] if self.concurrent else [asked] if asked else []
        for group in groups:
            overrides = [self.overrides(trial, slot) for trial, slot in group]
            self.running[pool.submit(self.launch, overrides, self.next_job)] = group
            self.next_job += len(group)

    def settle_ended(self) -> None:
        """Wait (a heartbeat at most) for launched trials to end, and settle those that did."""
        done, _ = wait(self.running, self.options.heartbeat_s, FIRST_COMPLETED)
        for job in done:
            group = self.running.pop(job)
            for (trial, _), ended in zip(group, job.result(), strict=True):
                self.settle(trial, ended)
        self.check_failures()

    def overrides(self, trial: optuna.Trial, slot: int) -> list[str]:
        """A trial's command line: the search space's values, its number, its placement."""
        overrides = [
            *self.space.overrides(trial.params),
            f"search.trial={trial.number}",
            *(self.slots[slot] if self.slots else []),
        ]
        log.info("trial %d: %s", trial.number, " ".join(overrides))
        return overrides

    def ask(self, wanted: int) -> list[optuna.Trial]:
        """Up to `wanted` trials (queued ones first), none beyond the study's n_trials."""
        asked = []
        for _ in range(wanted):
            trial = self.study.ask(self.space.distributions)
            ahead = [
                t
                for t in self.study.get_trials(deepcopy=False)
                if t.number < trial.number and counts_toward_budget(t)
            ]
            if len(ahead) >= self.options.n_trials:  # another sweep process asked first
                trial.set_user_attr(SURPLUS_ATTR, True)
                self.study.tell(trial, state=TrialState.FAIL)
                break
            self.in_flight[trial.number] = trial_id(self.storage, self.name, trial.number)
            self.storage.record_heartbeat(self.in_flight[trial.number])
            asked.append(trial)
        return asked

    def settle(self, trial: optuna.Trial, job: JobReturn) -> None:
        """A trial's job ended: fail it if it never told the study its result, and say how it
        ended."""
        stored_id = self.in_flight.pop(trial.number)
        if self.storage.get_trial(stored_id).state == TrialState.RUNNING:
            trial.set_user_attr(ERROR_ATTR, job_error(job))
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        ended = self.storage.get_trial(stored_id)
        said = [ended.state.name]
        if ended.value is not None:
            said.append(f"{self.options.objective} = {ended.value:.4f}")
        said.append(ended.user_attrs.get(ERROR_ATTR, ""))
        log.info("trial %d: %s", trial.number, " ".join(said).strip())

    def check_failures(self) -> None:
        failed = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if ERROR_ATTR in t.user_attrs
        ]
        if len(failed) > self.options.max_failure_rate * self.options.n_trials:
            raise SearchError(
                f"{len(failed)} trials of study {self.name} failed, more than "
                f"hydra.sweeper.max_failure_rate={self.options.max_failure_rate} of its "
                f"{self.options.n_trials}; the last: {failed[-1].user_attrs[ERROR_ATTR]}"
            )

    def ask_again(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A running trial whose heartbeats stopped: queue it again, end its MLflow run."""
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)
        log.warning(
            "trial %d sent no heartbeat for %d s (its process died): failed, and queued again",
            trial.number, self.options.heartbeat_s * 4,
        )  # fmt: skip
        if RUN_ATTR in trial.user_attrs:
            client = tracking_client(self.config.mlflow.tracking_uri)
            client.set_tag(trial.user_attrs[RUN_ATTR], "optuna.state", "FAIL")
            client.set_terminated(trial.user_attrs[RUN_ATTR], "KILLED")

    def record(self, status: str) -> None:
        """The study on its parent run: the best trial (`best_trial`), counts, every
        trial as a table, Optuna's figures; then the run ends with `status`."""
        client = tracking_client(self.config.mlflow.tracking_uri)
        trials = self.study.get_trials(deepcopy=False)
        ended = [t for t in trials if t.state in ENDED and counts_toward_budget(t)]
        states = Counter(t.state.name for t in ended)
        tags = {
            "sweep.trials": str(len(ended)),
            "sweep.trials_pruned": str(states["PRUNED"]),
            "sweep.trials_failed": str(states["FAIL"]),
        }
        best = self.best_trial()
        if best is not None:
            run_id = best.user_attrs.get(RUN_ATTR, "")
            client.log_metric(self.parent, self.options.objective, best.value, step=len(trials))
            tags |= {f"best.{key}": str(value) for key, value in best.params.items()}
            tags |= {"best.trial": str(best.number), "best_run_id": run_id}
            log.info(
                "sweep best: %s = %.4f with %s (trial %d, run %s)",
                self.options.objective, best.value,
                " ".join(f"{k}={v}" for k, v in best.params.items()), best.number, run_id,
            )  # fmt: skip
        for key, value in tags.items():
            client.set_tag(self.parent, key, value)
        with tempfile.TemporaryDirectory() as scratch:
            for path in [self.table(Path(scratch)), *self.figures(Path(scratch))]:
                client.log_artifact(self.parent, str(path), "study")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        for name in ("multirun.yaml", TRIALS_FILE):
            if (sweep_dir / name).is_file():
                client.log_artifact(self.parent, str(sweep_dir / name))
        client.set_terminated(self.parent, status)

    def best_trial(self) -> FrozenTrial | None:
        """The first trial (lowest number) of those with the study's best value. Optuna's own
        best_trial leaves ties to the storage: an SQL one's query orders by value alone."""
        try:
            best_value = self.study.best_value
        except ValueError:  # no trial finished
            return None
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return min((t for t in complete if t.value == best_value), key=lambda t: t.number)

    def table(self, directory: Path) -> Path:
        path = directory / "trials.csv"
        self.study.trials_dataframe().to_csv(path, index=False)
        return path

    def figures(self, directory: Path) -> list[Path]:
        """Optuna's optimisation history, intermediate values and parameter importances."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        drawn = []
        for name, plot in [
            ("optimization_history", plots.plot_optimization_history),
            ("intermediate_values", plots.plot_intermediate_values),
            ("param_importances", plots.plot_param_importances),
        ]:
            try:
                kwargs: dict[str, Any] = {}
                if name != "intermediate_values":
                    kwargs["target_name"] = self.options.objective
                axes = plot(self.study, **kwargs)
            except Exception as err:  # e.g. importances of fewer than two finished trials
                log.info("study figure %s not drawn: %s", name, err)
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            drawn.append(directory / f"{name}.png")
            figure.savefig(drawn[-1], dpi=100, bbox_inches="tight")
            plt.close(figure)
        return drawn


def job_error(job: JobReturn) -> str:
    """Why a job ended without telling its trial a result, in a line."""
    if job.status != JobStatus.FAILED:
        return "the trial returned without telling the study its result"
    try:
        job.return_value  # noqa: B018  (re-raises the job's exception)
    except Exception as err:
        return (str(err) or type(err).__name__).strip().splitlines()[0]
    return "failed"


class InThisThread(Executor):
    """Runs each submitted call at once, in the calling thread: the basic launcher runs its
    jobs in this process, where trainings must own the main thread (signal handlers)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future
