"""What the pipeline asks SLURM itself, through its client commands (`scontrol`, `squeue`,
`sacct`).

Node names are SLURM's, not host names: many sites name nodes by aliases (`NodeName=n1
NodeAddr=10.0.0.7`), so the address a process connects to is the node's `NodeAddr`, which
SLURM sets to the name when the config gives none. Accounting (slurmdbd, behind `sacct`) is
optional; a small lab's cluster often has none.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 30
LOST_JOB_PERIOD_S = 10.0
# job states from which a job may still write its result (squeue's %T names)
STILL_GOING = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "STOPPED",
        "PREEMPTED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "SPECIAL_EXIT",
    }
)
JOB_FOLDER = re.compile(r"\d+(_\d+)?")  # submitit's folder of a job, or of an array's task
# what submitit logs on each poll of a cluster whose `sacct` fails
SACCT_WARNING = "Bypassing sacct error"


def slurm(*command: str) -> str:
    """A SLURM client command's output; a SlurmError in its own words if it fails."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmError(f"{' '.join(command)}: {err}") from err
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SlurmError(f"{command[0]}: {said[0] if said else f'exit {result.returncode}'}")
    return result.stdout


class SlurmError(PipelineError):
    pass


def shown(kind: str, name: str) -> dict[str, str]:
    """`scontrol show KIND NAME` (a node, a job) as its fields."""
    line = slurm("scontrol", "show", kind, "-o", name)
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def first_node_address(nodelist: str) -> str:
    """The address SLURM reaches the first node of `nodelist` (a job's SLURM_JOB_NODELIST,
    such as n[1-2]) at: its NodeAddr."""
    first = slurm("scontrol", "show", "hostnames", nodelist).split()[0]
    return shown("node", first).get("NodeAddr") or first


def stopped_attempt(job: str) -> str | None:
    """How SLURM stopped this process's attempt at `job` (requeued, preempted, cancelled: its
    state and restarts now), or None while the attempt still runs or SLURM cannot say. A
    requeued job is COMPLETING, then PENDING, with one restart more than SLURM_RESTART_COUNT,
    this attempt's, says."""
    try:
        fields = shown("job", job)
    except SlurmError:
        return None
    state, restarts = fields.get("JobState"), fields.get("Restarts", "0")
    if state == "RUNNING" and restarts == os.environ.get("SLURM_RESTART_COUNT", "0"):
        return None
    return f"{state}, restarts={restarts}"


def accounting_error() -> str | None:
    """Why `sacct` cannot tell job states here (its own words), or None when it can."""
    try:
        slurm("sacct", "-n", "-X", "-j", "1")
    except SlurmError as err:
        return str(err).removeprefix("sacct: ")
    return None


class WithoutAccounting(logging.Filter):
    """Drops submitit's warning on each poll of a cluster without accounting: the sweep says
    once what it means (`without_accounting`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return SACCT_WARNING not in record.getMessage()


def without_accounting() -> bool:
    """Whether this cluster's `sacct` fails; if so, say once what that means for a sweep, and
    leave out submitit's repeated warning about it."""
    error = accounting_error()
    if error is None:
        return False
    log.info(
        "SLURM accounting is unavailable here (sacct: %s): each trial's state comes from the "
        "result its job writes, or from scontrol for a job that ended without one",
        error,
    )
    logging.getLogger("submitit").addFilter(WithoutAccounting())
    return True


def job_states(jobs: list[str]) -> dict[str, str]:
    """SLURM's states of `jobs` (IDs or ARRAYID_TASKs), in one `squeue`; a job slurmctld has
    forgotten (MinJobAge after it ended) is left out."""
    try:
        shown = slurm("squeue", "-h", "-r", "--states=all", "-o", "%i %T", "-j", ",".join(jobs))
    except SlurmError as err:
        if "Invalid job id" in str(err):  # squeue's answer when it knows none of them
            return {}
        raise
    return dict(line.split() for line in shown.splitlines() if line.strip())


class LostJobWatch(threading.Thread):
    """Without accounting, submitit learns that a job ended only from the result the job writes,
    and waits for ever on one killed before it could (scancel, out of memory, a failed node).
    Every LOST_JOB_PERIOD_S this thread asks SLURM, in one `squeue`, about the sweep's jobs (the
    folders submitit makes in `submitit_dir`) that have no result. Once none is still going and
    some ended without a result, it calls `on_lost` with {job: state} of those."""

    def __init__(self, submitit_dir: Path, on_lost: Callable[[dict[str, str]], None]) -> None:
        super().__init__(name="lost-slurm-jobs", daemon=True)
        self.submitit_dir, self.on_lost = submitit_dir, on_lost

    def run(self) -> None:
        ended: set[str] = set()
        while True:
            time.sleep(LOST_JOB_PERIOD_S)
            try:
                lost = self.lost_jobs(ended)
            except SlurmError as err:  # a busy or restarting controller: the next look
                log.warning("%s", err)
                continue
            if lost:
                self.on_lost(lost)
                return

    def lost_jobs(self, ended: set[str]) -> dict[str, str]:
        """{job: state} of the jobs lost for good, once no other job is still going. A job
        writes its result before it ends: one that ended without a result at two looks in a
        row (`ended` keeps the first) never gets one."""
        folders = list(self.submitit_dir.iterdir()) if self.submitit_dir.is_dir() else []
        arrays = {folder.name.split("_")[0] for folder in folders if "_" in folder.name}
        # not a job, a job array's own folder (its tasks have theirs), or done
        waiting = [
            folder.name
            for folder in folders
            if JOB_FOLDER.fullmatch(folder.name)
            and folder.name not in arrays
            and not any(folder.glob("*_result.pkl"))
        ]
        if not waiting:
            return {}
        states = job_states(waiting)
        going, lost = False, {}
        for job in waiting:
            state = states.get(job)
            if state in STILL_GOING:
                going = True
            elif job in ended:
                lost[job] = state or "ENDED"
            else:
                ended.add(job)
                going = True
        return {} if going else lost
