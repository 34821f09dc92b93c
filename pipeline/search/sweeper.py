"""`hydra/sweeper=optuna`: Hydra's Sweeper plugin over Optuna's ask-and-tell API.

    sweeper (this process)                   each trial (any launcher, process or node)
      create or load the study (storage)       load the study; its trial: search.trial
      ask a trial per free slot ─overrides─▶ launcher ─▶ train: report val/acc each epoch,
                                               stop when pruned, tell the study its result
      fail what never told ◀─ JobReturn ◀─┘
      parent MLflow run: the best trial, figures

The budget is the study's: n_trials trials end, over every run of the command (a rerun
resumes) and every sweep process sharing the study (trial numbers come from the storage, and a
trial asked beyond the budget by a racing process is told failed as surplus before it runs).
Trials whose process died (heartbeats stopped) are failed and asked again, with the same
parameters. Hydra finds plugins only in the `hydra_plugins` package: there, `OptunaSweeper`
is this class by its plugin name (hydra_plugins/convnet_pipeline/optuna_sweeper.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from pipeline.config import OptunaSweeperConfig
from pipeline.errors import PipelineError, SearchError
from pipeline.search.space import SearchSpace
from pipeline.tracking.sweeps import validate_trials

log = logging.getLogger(__name__)


class StudySweeper(Sweeper):
    """Runs `n_trials` trials of one Optuna study, `n_jobs` at a time, on Hydra's launcher."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # checked in setup, where an error is printed as one line
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        settings = {
            key: OmegaConf.to_container(value, resolve=True)
            if isinstance(value, DictConfig)
            else value
            for key, value in self.settings.items()
        }
        try:
            self.options = OptunaSweeperConfig(**settings)
        except (PipelineError, TypeError) as err:
            raise SearchError(str(err)) from err

    def sweep(self, arguments: list[str]) -> None:
        from pipeline.search.run import Search

        assert self.config is not None
        space = SearchSpace.parse(self.options.params, arguments)
        if not space.distributions:
            raise SearchError(
                "hydra/sweeper=optuna: nothing to search; give hydra.sweeper.params or sweeps "
                "on the command line, e.g. 'optimizer.lr=tag(log, interval(0.001, 0.1))'"
            )
        # every choice and bound, before the study, its parent run or any trial
        validate_trials(self.config, space.alternatives(), "search space")
        Search(self.config, self.options, space, self.launch).run()

    def launch(self, batch: Sequence[Sequence[str]], first_job: int) -> Sequence[JobReturn]:
        assert self.launcher is not None
        return self.launcher.launch(batch, initial_job_idx=first_job)


def launcher_parallelism(launcher: DictConfig) -> int | None:
    """Trials the launcher runs at once on this machine (None: it runs them on a cluster)."""
    if "submitit" in launcher._target_:
        return None
    n_jobs = launcher.get("n_jobs")
    if n_jobs is None:  # the basic launcher: one after another, in this process
        return 1
    return (os.cpu_count() or 1) + 1 + n_jobs if n_jobs < 0 else n_jobs  # joblib's count


def placement(config: DictConfig, options: OptunaSweeperConfig) -> tuple[int, list[list[str]]]:
    """(trials asked at once, each one's placement overrides by its slot in the batch).

    On this machine, single-device trainings share the cores (trainer.threads), and GPU ones
    run trials_per_device to a GPU, each pinned to one (trainer.device). A cluster places its
    jobs itself, DDP trials have devices of their own, and a setting given on the command line
    stays."""
    trainer = config.trainer
    parallel = launcher_parallelism(config.hydra.launcher)
    if parallel is None:
        return options.n_jobs or config.hydra.launcher.get("array_parallelism", 1), []
    gpu = trainer.accelerator in ("gpu", "cuda")
    gpus = 0
    if gpu and trainer.device is None:
        import torch

        gpus = torch.cuda.device_count()
    batch = options.n_jobs or (options.trials_per_device * gpus if gpus else parallel)
    single = trainer.strategy != "ddp" and trainer.devices == 1 and trainer.num_nodes == 1
    if not single:
        return batch, []
    slots: list[list[str]] = [[] for _ in range(batch)]
    if trainer.threads is None:
        threads = max(1, (os.cpu_count() or 1) // min(batch, parallel))
        slots = [[*slot, f"trainer.threads={threads}"] for slot in slots]
    if gpus:
        per_gpu = options.trials_per_device
        slots = [[*slot, f"trainer.device={i // per_gpu % gpus}"] for i, slot in enumerate(slots)]
    return batch, slots


def study_name(configured: str | None, experiment: str, choices: Mapping[str, Any]) -> str:
    """hydra.sweeper.study_name, else EXPERIMENT-SEARCH (the mlflow experiment and the
    hparams_search preset): the same command resumes the same study."""
    return configured or f"{experiment}-{choices.get('hparams_search') or 'search'}"
