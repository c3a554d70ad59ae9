"""Processes the stages start: a command captured whole, or a launcher's process group logged to
a file, signalled part way and waited for to the last process (Linux /proc)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from bench.gpucheck.common import REPO


def run_captured(cmd: list[str], env: dict, timeout: float) -> tuple[str, int | str]:
    """(stdout + stderr, exit code or "timeout") of a command run from the repository root."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        return proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
        return out, "timeout"


def tail(path: Path, n: int = 2500) -> str:
    """The last ``n`` characters of a log, or "" where there is none."""
    return path.read_text()[-n:] if path.is_file() else ""


def run_group(cmd: list[str], log: Path, env: dict, timeout: float, stop_when: Callable[[], bool] | None = None,
              signal_ranks: bool = False, kill_when: Callable[[], bool] | None = None) -> tuple[int, float]:
    """Run ``cmd`` (a launcher) as a process group of its own from the repository root, its output
    in ``log``. Once ``stop_when()`` holds, send SIGTERM once: to the whole group (as Ctrl-C or a
    scheduler does), or with ``signal_ranks`` to run.py's rank processes only (the group where
    none is found). Once ``kill_when()`` holds, SIGKILL the group (what it measured is on disk;
    what it would do next, such as an end-of-run checkpoint, is not wanted). Everything is killed
    past ``timeout`` seconds, or when this function is interrupted (a stage's budget).
    Returns (rc or -9, seconds)."""
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            return _wait_group(proc, t, timeout, stop_when, signal_ranks, kill_when)
        except BaseException:
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_group(proc: subprocess.Popen, t: float, timeout: float, stop_when, signal_ranks: bool,
                kill_when) -> tuple[int, float]:
    sent = False
    while proc.poll() is None:
        time.sleep(0.2)
        if time.perf_counter() - t > timeout or (kill_when is not None and kill_when()):
            _kill_group(proc)
            return -9, time.perf_counter() - t
        if stop_when is not None and not sent and stop_when():
            target = ranks_of(proc.pid) if signal_ranks else None
            if target:
                for pid in target:
                    os.kill(pid, signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            sent = True
    # deepspeed's runner dies of a group SIGTERM at once while launch.py and the ranks finish
    # the checkpoint: wait for every process of the group.
    while group_alive(proc.pid):
        if time.perf_counter() - t > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            return -9, time.perf_counter() - t
        time.sleep(0.2)
    return proc.returncode, time.perf_counter() - t


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies answer too; a group of zombies only is finished.
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def ranks_of(launcher_pid: int) -> list[int]:
    """PIDs of the run.py rank processes below the launcher (via /proc), not their DataLoader
    workers (forked, so with the same command line)."""
    out, parent = [], {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
            pgid = os.getpgid(int(d.name))
        except (OSError, ProcessLookupError):
            continue
        if pgid == launcher_pid and any(a.endswith(b"run.py") for a in cmdline) and b"--local_rank" in b" ".join(cmdline):
            out.append(int(d.name))
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return [p for p in out if parent[p] not in out]
