"""A private one-node Slurm cluster for the tests: munged, slurmctld and slurmd from the
distribution's packages (Debian: ``apt-get install slurmctld slurmd slurm-client munge``), run as
root with every file in one temporary directory.

The node is this machine with its real CPUs and memory (``slurmd -C``); processes are tracked by
parentage (``proctrack/linuxproc``) and not bound (``task/none``), so no cgroups or systemd are
needed. Its own munge key and socket, free ports for the daemons and ``SLURM_CONF`` in every
command's environment keep it apart from any Slurm the machine already runs. Two settings are
shortened for the tests: credentials live CRED_EXPIRE seconds (a requeued job waits that long, 2
minutes by default) and the scheduler looks at pending jobs every second (60 s by default).
:func:`why_not` says why it cannot run here (the tests skip with that reason).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scancel", "scontrol", "sinfo")
# Seconds a job credential lives (Slurm's default: 120). A requeued job may start again only once
# its previous run's credential has expired, so this is also how long a requeue waits.
CRED_EXPIRE = 8


def why_not() -> Optional[str]:
    """None when a cluster can be started here, else the reason."""
    missing = [d for d in DAEMONS if shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return (f"Slurm not installed ({', '.join(missing)} not found; Debian: apt-get install slurmctld slurmd "
                "slurm-client munge)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs (run the tests as root, e.g. in a container)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class SlurmCluster:
    """``start()`` the daemons and wait until the node is idle; ``stop()`` cancels every job and
    ends them. ``env`` is the environment for commands that talk to this cluster."""

    def __init__(self, root: Path, kill_wait: int = 10) -> None:
        self.root, self.kill_wait = root, kill_wait
        self.node = socket.gethostname().split(".")[0]
        # No SLURM_* of an outer job (a CI runner inside Slurm): srun would join that job.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(root / "slurm.conf")
        self._munged_pid: Optional[int] = None

    def _write_config(self) -> None:
        munge, state, spool, log = (self.root / d for d in ("munge", "state", "spool", "log"))
        for d in (munge, state, spool, log):
            d.mkdir(parents=True, exist_ok=True)
        # the node as slurmd sees it: CPUs, sockets, cores, threads, memory
        probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        node_line = next((line for line in probe.splitlines() if line.startswith("NodeName=")), "")
        hw = " ".join(f for f in node_line.split()[1:] if not f.startswith("UpTime"))
        if "RealMemory" not in hw:
            raise RuntimeError(f"slurmd -C printed no node description: {probe!r}")
        conf = f"""\
ClusterName=pytest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge / 'socket'},cred_expire={CRED_EXPIRE}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 {hw} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        (self.root / "slurm.conf").write_text(conf)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o600)
        munge.chmod(0o755)  # munged wants its socket's directory searchable by all

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        munge = self.root / "munge"
        self._check([_which("munged"), "--force", f"--socket={munge / 'socket'}", f"--key-file={munge / 'munge.key'}",
                     f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--seed-file={munge / 'munged.seed'}"])
        self._munged_pid = int((munge / "munged.pid").read_text())
        self._check([_which("slurmctld"), "-i"])  # -i: ignore state files a crashed run left (none here)
        self._check([_which("slurmd")])
        deadline = time.time() + timeout
        while True:
            state = self.command("sinfo", "-h", "-n", self.node, "-o", "%T").stdout.strip()
            if state == "idle":
                return
            if time.time() > deadline:
                raise RuntimeError(f"node {self.node} is {state or 'not reported'} after {timeout:.0f} s\n"
                                   + self.logs())
            time.sleep(0.3)

    def stop(self) -> None:
        self.command("scancel", "--partition=test")
        deadline = time.time() + self.kill_wait + 15
        while self.command("squeue", "-h").stdout.strip() and time.time() < deadline:
            time.sleep(0.5)
        pids = [self._pid(f) for f in ("slurmctld.pid", "slurmd.pid")]
        self.command("scontrol", "shutdown")
        for pid in [p for p in pids if p] + ([self._munged_pid] if self._munged_pid else []):
            self._end(pid)

    def command(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([_which(name), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as KEY -> value (JobState, Restarts, ExitCode, Reason, ...)."""
        text = self.command("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def _check(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}\n{self.logs()}")

    def _pid(self, name: str) -> Optional[int]:
        try:
            return int((self.root / name).read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _end(pid: int, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL if it is still there ``grace`` seconds later."""
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + grace
            while _running(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (the daemons' parent is init, which may reap late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
