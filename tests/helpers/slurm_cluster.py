"""A real Slurm cluster on 127.0.0.1 for tests: munged, slurmctld and two slurmd
processes acting as nodes n1 and n2 (Debian's slurmctld, slurmd, slurm-client and munge,
installed by .ci/system-packages.sh). Everything lives in a temporary folder: its own
munge key and socket, slurm.conf, state, spool and logs, and free ports, so it disturbs
no other Slurm or munge on the machine. Torn down (jobs cancelled, daemons killed by
process group) at the end of the session.

Jobs run as the user running the tests (root on CI) with the test's environment, which
carries the project's Python first on PATH and SLURM_CONF pointing at this cluster.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.distributed import free_port
from tests.conftest import require_component

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

SLURM_CONF = """\
ClusterName=pix2pixtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# Our own munged; cred_expire also sets how long a requeued job waits before it may run
# again (default 120 s): short here so the preemption test stays short.
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# linuxproc tracks every descendant of a task, as cgroup tracking does on real clusters:
# a signal to the job step reaches the launchers and the workers (in their own sessions).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MinJobAge=600
KillWait=30
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} Port={n1_port} CPUs=1 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname={host} Port={n2_port} CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        python_bin = os.path.dirname(sys.executable)
        self.env.update(SLURM_CONF=str(self.conf),
                        PATH=os.pathsep.join([python_bin, SEARCH_PATH]))

    # -------------------------------------------------------------- daemons
    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        process = subprocess.Popen([_which(name), *args], env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool/n1", "spool/n2", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        socket_path = root / "munge" / "munge.socket"
        self._start("munged", "--foreground", "--force", f"--socket={socket_path}",
                    f"--key-file={key}", f"--log-file={root}/log/munged.log",
                    f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/seed")
        self._wait(lambda: socket_path.exists(), 10, "munged did not create its socket")
        ports = dict(ctld_port=free_port(), slurmd_port=free_port(), n1_port=free_port(),
                     n2_port=free_port())
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        self.conf.write_text(SLURM_CONF.format(root=root, user=user, host=socket.gethostname(),
                                               **ports))
        self._start("slurmctld", "-D", "-f", str(self.conf))
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30,
                   "slurmctld did not answer")
        for node in ("n1", "n2"):
            self._start("slurmd", "-D", "-N", node, "-f", str(self.conf))
        self._wait(self._nodes_idle, 60, "the nodes did not become idle")

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return dict(zip(out[::2], out[1::2])) == {"n1": "idle", "n2": "idle"}

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{what} within {timeout} s\n" + self.logs())

    def stop(self) -> None:
        self.run("scancel", "--quiet", "--full", *self.job_ids(), check=False)
        deadline = time.monotonic() + 30
        while self.job_ids() and time.monotonic() < deadline:
            time.sleep(0.5)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self, lines: int = 40) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -------------------------------------------------------------- clients
    def run(self, *command: str, check: bool = True, env: dict | None = None,
            cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([_which(command[0]) or command[0], *command[1:]],
                                env=env or self.env, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {result.returncode}\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> str:
        """Submits; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job_ids(self) -> list[str]:
        result = self.run("squeue", "-h", "-o", "%i", check=False)
        return result.stdout.split() if result.returncode == 0 else []

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job` as dicts, one per job (an array job: one per task)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        records = []
        for line in out.splitlines():
            record = {}
            for token in line.split():
                key, _, value = token.partition("=")
                record[key] = value
            records.append(record)
        return records

    def job(self, job_id: str) -> dict:
        return self.jobs(job_id)[0]

    def wait_until_done(self, job_id: str, timeout: float) -> dict:
        """Waits until every task of the job is in a final state; returns the first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if all(r["JobState"] in TERMINAL for r in records):
                return records[0]
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not done within {timeout} s: {self.jobs(job_id)}\n"
                           + self.logs())


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Two nodes (n1, n2, 1 CPU each) on 127.0.0.1 in partition debug."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    require_component(not missing, "Slurm (Debian packages slurmctld, slurmd, slurm-client, "
                      f"munge; missing: {', '.join(missing)})")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
