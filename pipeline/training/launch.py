"""DDP's processes: torch's elastic launcher starts one per device, and each runs `train`.

Every rank gets the same config and output directory, so a training is one directory and one
MLflow run however many ranks it has; in a sweep too, where the ranks are children of the
trial's process, which never joins a process group itself and so leaves the next trial a
clean process. Lightning sees a torchelastic environment and launches nothing itself. Each
rank's output is also kept in OUTPUT_DIR/logs. A process that a launcher already started as
a rank (torchrun, or SLURM: one task per device, as `hydra/launcher=slurm` asks for) trains in
place; Lightning takes its rank from that launcher.

Several machines: the same command on each, with MASTER_ADDR and MASTER_PORT (node 0's
address and a free port there) and NODE_RANK set, as torchrun's static rendezvous takes them;
or a SLURM job of trainer.num_nodes nodes with trainer.devices tasks on each, whose rank 0 is
at the address SLURM has for the job's first node (its NodeAddr; a MASTER_ADDR in the job's
environment wins). Ranks that cannot meet there, or lose each other later, fail after
trainer.ddp_timeout_s, saying where they tried to meet.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from torch.distributed import DistError
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from pipeline.config import TrainJob
from pipeline.errors import PipelineError
from pipeline.models.backbones import backbone_entry
from pipeline.search.study import StudyTrial
from pipeline.slurm import first_node_address, stopped_attempt
from pipeline.tracking.runs import TrainingRun
from pipeline.tracking.store import experiment_id, open_store
from pipeline.training.fit import open_data, train

log = logging.getLogger(__name__)

NODE_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def run_training(
    cfg: TrainJob,
    output_dir: Path,
    run_tags: Mapping[str, str],
    trial: StudyTrial | None = None,
) -> dict[str, float]:
    """Train here, or as `trainer.devices` DDP ranks on this node; returns rank 0's metrics
    (on nodes other than node 0: their first rank's). A search's `trial` goes to every rank."""
    trainer = cfg.trainer
    # a backbone the zoo does not have, or a `_target_` that does not import: here, before all
    backbone_entry(cfg.model.backbone)
    # missing, mismatched or damaged data fails here, before the store or any rank
    data = open_data(cfg)
    # before any rank: processes started together (DDP ranks, SLURM tasks, DVC stages beside a
    # sweep) take turns creating a new store, and its experiment exists before they log to it
    experiment_id(open_store(cfg.mlflow.tracking_uri), cfg.mlflow.experiment)
    if SLURMEnvironment.detect():
        return train_as_slurm_task(cfg, output_dir, run_tags, trial)
    if trainer.strategy != "ddp" or trainer.world_size == 1 or TorchElasticEnvironment.detect():
        return train(cfg, output_dir, run_tags, trial=trial, datamodule=data)
    launch = LaunchConfig(
        min_nodes=trainer.num_nodes,
        max_nodes=trainer.num_nodes,
        nproc_per_node=trainer.devices,
        max_restarts=0,
        # fork: the ranks start with this process's imports; it has computed nothing with
        # torch (no CUDA context, no thread pool) for them to inherit
        start_method="fork",
        logs_specs=DefaultLogsSpecs(log_dir=str(output_dir / "logs"), tee=Std.ALL),
        **rendezvous(trainer.num_nodes, trainer.ddp_timeout_s),
    )
    try:
        results = elastic_launch(launch, train_rank)(cfg, output_dir, dict(run_tags), trial)
    except DistError as err:  # this node's launcher never met node 0's
        raise ranks_apart(cfg, err) from err
    except ChildFailedError as err:
        TrainingRun.end_abandoned(output_dir)  # rank 0 may have died without ending it
        rank, failure = err.get_first_failure()
        message = failure.message  # the rank's exception, as @record wrote it
        if isinstance(message, dict):
            message = message.get("message", message)
        raise PipelineError(f"DDP rank {rank} failed: {message}") from err
    return results[min(results)]


def train_as_slurm_task(
    cfg: TrainJob, output_dir: Path, run_tags: Mapping[str, str], trial: StudyTrial | None
) -> dict[str, float]:
    """Train as the SLURM task this process is: SLURM starts one per rank, on every node.

    The run is tagged with the job and its nodes, and each task says in the log (the trial's,
    which its tasks share) which rank it is and where it runs. A task that fails because SLURM
    stopped its job (preemption, a requeue, a cancel: its ranks lose each other) exits without
    a result, as a task killed in time would: submitit would keep an error as the job's result
    and the sweep would read it as the trial's, while the job's next attempt resumes it."""
    job = slurm_job_id()
    nodes = os.environ["SLURM_JOB_NODELIST"]
    rank, tasks = os.environ.get("SLURM_PROCID", "0"), os.environ["SLURM_NTASKS"]
    where = f"rank {rank} of {tasks} on node {os.environ['SLURMD_NODENAME']}"
    if cfg.trainer.world_size > 1:
        # else Lightning takes the first node's name, which need not resolve as a host name
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_node_address(nodes)
        where += f", rank 0 at {os.environ['MASTER_ADDR']}"
    log.info("SLURM job %s: %s", job, where)
    tags = {**run_tags, "slurm.job_id": job, "slurm.nodes": nodes}
    try:
        return train(cfg, output_dir, tags, trial=trial)
    except Exception as err:
        if stopped := stopped_attempt(job):
            log.warning(
                "SLURM stopped this attempt at job %s (%s): it ends without a result", job, stopped
            )
            raise SystemExit(f"SLURM stopped job {job} ({stopped}) as it ran: {err}") from err
        if isinstance(err, DistError):
            raise ranks_apart(cfg, err) from err
        raise


def ranks_apart(cfg: TrainJob, err: DistError) -> PipelineError:
    """The training's ranks could not meet, or lost each other, at rank 0's address: one line
    saying where and what to check."""
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PipelineError(
        f"DDP ranks could not reach each other at {address}, waiting trainer.ddp_timeout_s="
        f"{cfg.trainer.ddp_timeout_s:g} s ({said}): check that every node resolves and reaches "
        f"that address on that port (MASTER_ADDR, MASTER_PORT), and that all "
        f"{cfg.trainer.world_size} ranks started"
    )


def slurm_job_id() -> str:
    """The job's id as squeue shows it and scontrol takes it: ARRAYID_TASK for a sweep's
    trial (a task of the sweep's job array)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def rendezvous(num_nodes: int, timeout_s: float) -> dict[str, object]:
    """Where the nodes' launchers meet, waiting at most `timeout_s` for each other: on this
    machine alone, or at node 0 (torchrun's --standalone, or its
    --master-addr/--master-port/--node-rank)."""
    if num_nodes == 1:
        return {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "run_id": str(uuid.uuid4())}
    missing = [name for name in NODE_VARIABLES if name not in os.environ]
    if missing:
        raise PipelineError(
            f"trainer.num_nodes={num_nodes} needs {', '.join(missing)} in the environment: node "
            "0's address, a free port there, and this node's rank (0 to num_nodes - 1)"
        )
    return {
        "rdzv_backend": "static",
        "rdzv_endpoint": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "rdzv_configs": {"rank": int(os.environ["NODE_RANK"]), "timeout": math.ceil(timeout_s)},
        "run_id": "none",
    }


@record  # a rank's exception reaches the launcher as its failure message
def train_rank(
    cfg: TrainJob, output_dir: Path, run_tags: dict[str, str], trial: StudyTrial | None
) -> dict[str, float]:
    return train(cfg, output_dir, run_tags, trial=trial)
