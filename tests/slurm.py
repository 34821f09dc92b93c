"""A real two-node SLURM cluster on 127.0.0.1 for the tests: Debian's slurm-wlm daemons, one
slurmctld and a slurmd for each of the nodes n1 and n2, both on this machine. Configured as a
small lab's cluster often is: nodes named by aliases that are no host names (NodeName=n1
NodeHostname=this machine NodeAddr=127.0.0.1), no munge (auth/none), and no accounting
database, so that `sacct` fails.

    with SlurmCluster(directory) as cluster:
        subprocess.run(["srun", "-N2", "hostname"], env=cluster.environment(os.environ))

All it writes (config, state, spool, logs) stays in `directory`. The daemons run in the
foreground as the current user, and stopping the cluster ends every process it started, jobs
included.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

NODES = ("n1", "n2")
# enough for two 2-node jobs of one CPU per task at once, whatever this machine has
CPUS_PER_NODE = 4
DAEMONS = ("slurmctld", "slurmd")
# variables of a surrounding SLURM job or DDP training, and sbatch/srun's input variables: none
# may leak in, as none are in a user's fresh shell
FOREIGN = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "MASTER_ADDR", "MASTER_PORT")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SlurmClusterError(RuntimeError):
    pass


class SlurmCluster:
    """slurmctld and two slurmd processes on loopback, configured and kept under `root`."""

    def __init__(self, root: Path, start_timeout_s: float = 60.0) -> None:
        self.root = root.resolve()
        self.start_timeout_s = start_timeout_s
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.daemons: dict[str, subprocess.Popen] = {}

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` for a client of this cluster (sbatch, squeue, a Hydra sweep submitting to it):
        its SLURM_CONF, nothing of another cluster's job."""
        variables = {name: value for name, value in base.items() if not name.startswith(FOREIGN)}
        return {**variables, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str) -> str:
        """A client command's output; it must succeed."""
        result = subprocess.run(
            command, env=self.environment(os.environ), capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise SlurmClusterError(f"{' '.join(command)}: {result.stdout}{result.stderr}")
        return result.stdout

    def __enter__(self) -> SlurmCluster:
        missing = [name for name in DAEMONS if shutil.which(name) is None]
        if missing:
            raise SlurmClusterError(f"{', '.join(missing)} not on PATH: install slurm-wlm")
        self.write_config()
        try:
            self.start("slurmctld", "-c", "-i")  # a clean start: no state of an earlier cluster
            for node in NODES:
                self.start(f"slurmd-{node}", "-N", node)
            self.wait_until_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def write_config(self) -> None:
        for directory in ("etc", "state", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        # an empty plugin stack, so that the system's /etc/slurm/plugstack.conf is not read
        (self.root / "etc" / "plugstack.conf").write_text("")
        controller_port, *node_ports = free_ports(1 + len(NODES))
        host, user, root = socket.gethostname().split(".")[0], getpass.getuser(), self.root
        nodes = "\n".join(
            f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
            f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
            for node, port in zip(NODES, node_ports, strict=True)
        )
        self.conf.write_text(f"""\
ClusterName=tests
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
# a requeued job waits cred_expire + 1 seconds before it may start again (default: 121)
AuthInfo=cred_expire=5
# no cgroups, no CPU binding: works in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# ended jobs stay visible to `scontrol show job` for an hour
MinJobAge=3600
MpiDefault=none
MailProg=/bin/true
PlugStackConfig={root}/etc/plugstack.conf
# nodes may claim more CPUs than this machine has
SlurmdParameters=config_overrides
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=10
InactiveLimit=0
# SIGKILL 2 s after SIGTERM when a job is cancelled or requeued
KillWait=2
Waittime=0
JobRequeue=1
SchedulerType=sched/backfill
# the scheduler looks at the queue every second (default: every 60)
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
""")

    def start(self, name: str, *options: str) -> None:
        """Start daemon `name` (slurmctld, or slurmd-NODE) in the foreground, logging to
        log/NAME.stdout. The environment marks it, and the slurmstepd processes it forks,
        which outlive it, as this cluster's."""
        executable = name.split("-")[0]
        environment = {**self.environment(os.environ), "SLURM_TESTS_CLUSTER": str(self.root)}
        with (self.log_dir / f"{name}.stdout").open("wb") as output:
            self.daemons[name] = subprocess.Popen(
                [executable, "-D", "-f", str(self.conf), *options],
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, daemon in self.daemons.items():
                if daemon.poll() is not None:
                    raise SlurmClusterError(f"{name} exited ({daemon.returncode})\n{self.logs()}")
            shown = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"],
                env=self.environment(os.environ),
                capture_output=True,
                text=True,
                timeout=30,
            )
            states = dict(line.split() for line in shown.stdout.splitlines() if " " in line)
            if all(states.get(node) == "idle" for node in NODES):
                return
            time.sleep(0.2)
        raise SlurmClusterError(f"nodes not idle after {self.start_timeout_s} s: {states}")

    def logs(self, lines: int = 40) -> str:
        """The last `lines` of each daemon log, to explain a failure."""
        return "\n".join(
            f"==> {path} <==\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in sorted(self.log_dir.iterdir())
        )

    def cancel_jobs(self, drain_timeout_s: float = 30.0) -> None:
        """Cancel every job, and wait until they have ended (or `drain_timeout_s` passed)."""
        self.run("scancel", "--user", getpass.getuser())
        deadline = time.monotonic() + drain_timeout_s
        while self.run("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then end whatever of this cluster is left."""
        controller = self.daemons.get("slurmctld")
        if controller is not None and controller.poll() is None:
            # first, while slurmctld is up: a slurmd with a job running ignores SIGTERM, and a
            # slurmstepd whose slurmctld is gone keeps trying to reach it
            with contextlib.suppress(SlurmClusterError, subprocess.TimeoutExpired):
                self.cancel_jobs()
        for daemon in self.daemons.values():
            daemon.terminate()
        for daemon in self.daemons.values():
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:  # SIGTERM in its first moments can go unheeded
                daemon.kill()
                daemon.wait()
        self.daemons.clear()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            leftovers = self.leftover_pids()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                    os.kill(pid, sig)
            if leftovers:
                time.sleep(1)

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster still alive: slurmstepd (the daemons' mark, inherited)
        and job tasks (this cluster's SLURM_CONF and a SLURM_JOB_ID). A client such as a
        sweep that submits to it has no SLURM_JOB_ID, and is left alone."""
        daemon = f"SLURM_TESTS_CLUSTER={self.root}".encode()
        conf = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                variables = (entry / "environ").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile, or not ours to read
                continue
            in_job = conf in variables and any(v.startswith(b"SLURM_JOB_ID=") for v in variables)
            if daemon in variables or in_job:
                pids.append(int(entry.name))
        return pids
