"""Stop requests: a signal however it is delivered, or the death of the launcher, ends the run
with a checkpoint at a step boundary.

How launchers deliver them, and what this module does about each:

* a scheduler or ``kill -TERM -PGID`` signals every process of the job at once, and Ctrl-C sends
  SIGINT to the terminal's whole foreground group: the DataLoader workers would die first and take
  the rank down mid-step, so workers ignore these signals (:func:`ignore_in_worker`) and exit
  with their rank;
* DeepSpeed's ``launch.py`` answers SIGINT/SIGTERM by sending SIGTERM to every rank and, 30 s
  later, SIGKILL: a rank therefore often sees two signals, and only the first one counts;
* SIGTERM to the ``deepspeed`` runner (or ``mpiexec``) alone ends that process and leaves the
  ranks running: each rank watches the launcher processes above it and treats the death of one
  as a stop request (:meth:`StopRequest.poll`);
* Slurm: ``--signal=USR1@SECONDS`` sends SIGUSR1 ahead of the time limit (``B:USR1`` to the batch
  shell only, which ``slurm/pretrain.sbatch`` forwards to the steps), and a cancel, a time limit
  or a preemption sends SIGTERM to every task, then SIGKILL after ``KillWait`` (``GraceTime``):
  both are stop requests. ``srun`` itself forwards SIGUSR1 and SIGINT to its tasks but answers
  SIGTERM with SIGKILL to every task ("forcing job termination"): stop a step with ``scancel
  --signal=TERM JOBID`` (the tasks), never ``kill -TERM`` of ``srun`` or ``scancel --full``. A
  task's parent is ``slurmstepd`` (``srun`` runs elsewhere, no ancestor of any rank): should it
  die, the orphaned rank stops and saves.

Every rank saves at the same step: the request is agreed through the step's flags collective
(``pretrain.steps``).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Command-line fragments of the processes that start ranks: deepspeed's runner and launch.py,
# torchrun, MPICH/Open MPI launchers and their per-node proxies, Slurm's step daemon.
LAUNCHER_MARKS = (b"deepspeed", b"mpiexec", b"mpirun", b"hydra_pmi_proxy", b"orted", b"prterun", b"prted",
                  b"torch.distributed.run", b"torchrun", b"slurmstepd")


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: stop signals are the rank's business. A worker exits when
    its rank closes the loader or dies (PyTorch's worker watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _parent(pid: int) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def launcher_ancestors(pid: Optional[int] = None) -> list[int]:
    """PIDs of the launcher processes directly above ``pid`` (default: this process), nearest
    first: the chain stops at the first ancestor that is not a launcher (a shell, a job step)."""
    out = []
    cur = _parent(pid or os.getpid())
    while cur and cur > 1 and any(mark in _cmdline(cur) for mark in LAUNCHER_MARKS):
        out.append(cur)
        cur = _parent(cur)
    return out


class StopRequest:
    """The first stop signal sets ``signal``; later ones are acknowledged and otherwise ignored
    (the launcher forwards the same request, and a KeyboardInterrupt mid-step would lose it).
    ``poll()`` also reports the death of a launcher process above this rank."""

    def __init__(self, announce: bool = True) -> None:
        self.signal = 0
        self.reason = ""
        self.announce = announce
        self._ancestors = launcher_ancestors()
        self._parent = os.getppid()
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal:
            if self.announce:
                print(f"received {name} while stopping: still saving the checkpoint "
                      "(SIGKILL or Ctrl-\\ aborts at once)", file=sys.stderr, flush=True)
            return
        self.signal = signum
        self.reason = f"received {name}"
        if self.announce:
            print(f"\nreceived {name}: saving a checkpoint at the next step boundary", flush=True)

    def poll(self) -> bool:
        """True once a stop was requested on this rank (a signal, or a launcher above it died)."""
        if self.signal:
            return True
        if self._ancestors and (os.getppid() != self._parent or not all(_alive(p) for p in self._ancestors)):
            self.signal = signal.SIGTERM
            self.reason = "a launcher process above this rank has exited"
            if self.announce:
                print(f"\n{self.reason}: saving a checkpoint at the next step boundary", flush=True)
            return True
        return False

    def restore(self) -> None:
        """The handlers from before (Ctrl-C raises KeyboardInterrupt again, SIGTERM ends the process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill(0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
