"""One run per output directory: ``OUTPUT/.lock``, held by rank 0 for the run's life.

Two launches into one ``--output`` would otherwise mix silently (one run's checkpoints, the
other's ``config.effective.json``, both runs' lines in ``metrics.jsonl``). Rank 0 takes an
exclusive lock on ``OUTPUT/.lock`` before anything is written there and keeps it until the
process ends; the file records who holds it (pid, host, start time) for the refusal message.

The lock is a POSIX record lock (``fcntl.lockf``), not ``flock``: the kernel drops it when the
holding process dies, however it dies (SIGKILL, OOM), so a crashed run never leaves it behind and
``--resume`` after a crash just takes it (saying whose it was); unlike ``flock`` it is not
inherited by forked children (DataLoader workers outliving their rank do not keep it), and it is
the kind of lock NFS forwards to the server. Caveat: on a shared filesystem mounted without lock
support (NFS ``nolock``, no lockd) every lock "succeeds"; as a fallback a launch also refuses an
output whose ``.lock`` names a live process on this host, but a live holder on another node is
then invisible. A POSIX lock is released when its process closes *any* descriptor of the file, so
nothing in the holding process may open ``.lock`` after :meth:`OutputLock.acquire`.

Phase 2 reads phase 1's output (``--init-checkpoint``) and locks only its own.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".lock"


def _start_ticks(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid
    it names one process, not a later one that reused the number. None if there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    """'pid 123 on host node1, started 2026-12-04 20:01:02 UTC' from a lock file's record."""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


def _live_here(info: dict) -> bool:
    """The record names a process alive on this host (the same one: pid and start time agree)."""
    pid = info.get("pid")
    return (info.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
            and _start_ticks(pid) is not None and _start_ticks(pid) == info.get("ticks"))


def holder(output: Path) -> Optional[str]:
    """Who holds ``output`` now (a description), or None if it is free. Takes nothing: a shared
    lock probed and dropped at once (probes of several ranks do not conflict with each other)."""
    path = Path(output) / LOCK_NAME
    if not path.is_file():
        return None
    info = _read(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return describe(info)
    finally:
        os.close(fd)  # also drops the shared lock
    return describe(info) if _live_here(info) else None


class OutputLock:
    """``acquire()`` once in rank 0; the lock lives as long as the process (or until ``release``)."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self, wait: float = 2.0) -> tuple[Optional[str], Optional[str]]:
        """(None, note) when taken, note saying whose crashed run's lock it took over (or None);
        (holder, None) when another run holds it. ``wait``: seconds to retry, for another
        launch's probe that holds a shared lock for an instant."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return describe(_read(self.path)), None
                time.sleep(0.1)
        previous = _read(self.path)
        if _live_here(previous):  # locks not honoured here (NFS without lockd): the record decides
            os.close(fd)
            return describe(previous), None
        self.fd = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(), "ticks": _start_ticks(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        # A record left behind is a run that ended without release(): crashed or killed.
        note = None if not previous else f"{describe(previous)}, which has ended without releasing it"
        return None, note

    def release(self) -> None:
        """Empty the record (a clean end) and drop the lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None


def busy_message(output, who: str) -> str:
    return f"{output} is in use by another run ({who}); wait for it to end, or choose another --output"


def hold(output: Path, rank: int, device) -> Optional[OutputLock]:
    """Rank 0 takes ``output``'s lock for the rest of the process; every rank learns the outcome
    (one collective, at start) and all refuse together (``ConfigError``: exit 2) if another run
    holds it. Called once the engine exists (its device is where the collective runs) and before
    anything is written to ``output``."""
    import atexit

    import deepspeed.comm as dist
    import torch

    from .config import ConfigError

    lock = OutputLock(output) if rank == 0 else None
    who, note = lock.acquire() if lock is not None else (None, None)
    refused = torch.tensor([0.0 if who is None else 1.0], device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(refused)  # rank 0's answer, to every rank
    if refused.item() > 0:
        raise ConfigError(busy_message(output, who or "see rank 0"))
    if lock is not None:
        if note:
            print(f"pretrain: taking over {lock.path} from {note} (crashed or killed)", flush=True)
        atexit.register(lock.release)
    return lock
