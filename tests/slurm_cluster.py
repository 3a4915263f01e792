"""A real one-host Slurm cluster for the launcher tests: munged, slurmctld and slurmd of this machine's
``slurm-wlm``/``munge`` packages (``scripts/setup.sh`` installs them), configured in a temp dir.

Everything the cluster uses lives in that directory: ``slurm.conf`` (reached through ``SLURM_CONF``, which
``sbatch`` exports into the jobs, so ``scontrol``/``scancel`` in a batch script talk to this cluster), a
fresh munge key and ``munged`` socket, state, spool and logs. The node has this machine's real CPU count
and memory (``slurmd -C``) and no GPU. Ports are free ones picked at start, so two clusters (two test
sessions) can run side by side. The daemons run in the foreground as children of the test process and are
stopped by PID; job processes that survive (``slurmstepd`` and its tasks carry ``SLURM_CONF`` in their
environment) are killed by PID too.

The cluster has two nodes on this one host: Debian's slurmd runs several node names per host
(``slurmd -N <name>``, each on its own port, spool and PID file), so a job can get a real two-node
allocation here (each node reports the host's CPUs).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun")
PARTITION = "cpu"


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the cluster (no root, or the packages are missing); the message says which."""


def missing_binaries() -> list[str]:
    return [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None
            and not Path("/usr/sbin", b).exists()]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """``slurmd -C``'s description of this machine (CPUs, sockets, cores, threads, RealMemory)."""
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    first = out.splitlines()[0]
    return dict(kv.split("=", 1) for kv in first.split())


@dataclass
class SlurmCluster:
    """One controller, ``nodes`` node names on this host, one partition ``cpu``; ``env`` points clients at it."""

    root: Path
    nodes: int = 2
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    hardware: dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    @property
    def node_names(self) -> list[str]:
        return [self.host, *(f"{self.host}-{i}" for i in range(2, self.nodes + 1))]

    @property
    def cpus(self) -> int:
        return int(self.hardware["CPUs"])

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self.logs()}")
        return proc

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        hw = self.hardware = node_hardware()
        node = " ".join(f"{k}={hw[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                   "ThreadsPerCore", "RealMemory") if k in hw)
        (r / "plugstack.conf").write_text("")
        nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} Port={free_port()} {node} State=UNKNOWN"
                          for n in self.node_names)
        self.conf.write_text(f"""# one-host test cluster (tests/slurm_cluster.py)
ClusterName=r1megatest
SlurmctldHost={self.host}
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this many seconds after it ended (default 120)
AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=5
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd'}-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd'}-%n.log
PlugStackConfig={r / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# a pending job (a requeued one, whose start waits cred_expire) is looked at every 2 s, not every 60 s
SchedulerParameters=sched_interval=2
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
# SIGTERM -> SIGKILL at scancel/time limit: room for a checkpoint on a loaded machine (Slurm's default: 30)
KillWait=120
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=300
{nodes}
PartitionName={PARTITION} Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
""")
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.root / "log" / f"{name}.stdout").open("ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the one-host Slurm cluster needs root (slurmd runs jobs as their users)")
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"Slurm/munge binaries missing: {', '.join(missing)} "
                                   f"(bash scripts/setup.sh installs slurm-wlm and munge as root)")
        self.write_config()
        m = self.root / "munge"
        self._spawn("munged", [_exe("munged"), "-F", "--force", f"--socket={m / 'munge.socket'}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={m / 'seed'}"])
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged's socket")
        self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", check=False).returncode == 0, timeout, "slurmctld")
        for n in self.node_names:
            self._spawn(f"slurmd-{n}", [_exe("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
                   == ["idle"] * self.nodes, timeout, f"{self.nodes} node(s) to be idle in sinfo")
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [f"{n} (rc {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Slurm test cluster: waiting for {what} failed "
                                   f"({'exited: ' + ', '.join(dead) if dead else f'{timeout:.0f}s timeout'})\n"
                                   f"{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")[-tail:]
            if text.strip():
                parts.append(f"--- {f.name}\n{text}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ jobs

    def sbatch(self, script: Path, *args: str) -> int:
        out = self.run("sbatch", "--parsable", *args, str(script)).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def job_pids(self, job_id: int | None = None, argv_has: str = "", argv_lacks: str = "\0") -> list[int]:
        """Processes of this cluster's jobs (they carry its SLURM_CONF in their environment), of one job when
        ``job_id`` is given, whose command line contains ``argv_has`` and not ``argv_lacks``."""
        mine = {f"SLURM_CONF={self.conf}".encode()}
        if job_id is not None:
            mine.add(f"SLURM_JOB_ID={job_id}".encode())
        daemons = {p.pid for p in self.procs.values()}
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in daemons or int(d.name) == os.getpid():
                continue
            try:
                argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if mine <= set((d / "environ").read_bytes().split(b"\0")) and argv_has in argv \
                        and argv_lacks not in argv:
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", PARTITION, check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(list(self.procs.values())):  # slurmd(s), slurmctld, munged
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.job_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()
