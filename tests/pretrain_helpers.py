"""Shared by the pretraining tests: launching run.py the ways users do, and delivering signals.

The data (``pretrain_work``) and phase 1 (``phase1``: a straight run under ``mpiexec`` and the
same run stopped by a real Ctrl-C under ``deepspeed`` then resumed) are session fixtures in
``conftest.py``, built once for the e2e, signal and checkpoint tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "pretrain" / "run.py"
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
STEPS = 6
# bf16 pinned (the config says "auto": fp32 on CPUs without bf16 instructions): phase 1 takes the
# path GPU runs take, DeepSpeed's bf16 optimizer under ZeRO-2, on every machine.
PHASE1 = ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--max-steps", str(STEPS),
          "--train-batch-size", "16", "--micro-batch-size", "4", "--set", "pretrain.log_every=1",
          "--set", "bf16.enabled=true", "--set", "pretrain.eval_samples=32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The launchers (and mpi4py discovery) must decide ranks, not variables left by this process."""
    base = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    return dict(base, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(cmd: list[str], cwd: Path, expect: int = 0) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-5000:]
    return out


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    return found


def command(launcher: str, out: str, *extra: str) -> list[str]:
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), str(RUN), *PHASE1, "--output", out, *extra]
    return [mpiexec(), "-n", "2", sys.executable, str(RUN), *PHASE1, "--output", out, *extra]


def losses(run_dir: Path) -> dict[int, float]:
    recs = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def processes(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of a process group: pid -> command line."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out[int(d.name)] = cmd
    return out


def targets(pgid: int, who: str) -> list[int]:
    procs = processes(pgid)
    if who == "runner":
        return [pgid]
    if who == "launch":
        return [p for p, c in procs.items() if "deepspeed.launcher.launch" in c]
    if who == "ranks":  # run.py processes whose parent is not a run.py process (not the DataLoader workers);
        # the launchers (DeepSpeed's runner and launch.py, mpiexec) carry run.py in their command lines too
        ranks = [p for p, c in procs.items()
                 if "run.py" in c and not any(m in c for m in ("deepspeed.launcher", "mpiexec", "hydra"))]
        parent = {p: int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in ranks}
        return [p for p in ranks if parent[p] not in ranks]
    raise ValueError(who)


def interrupted_run(cwd: Path, launcher: str, who: str, sig: signal.Signals, out: str) -> tuple[str, float]:
    """Start phase 1, deliver ``sig`` to ``who`` once step 2 is logged, wait until every process of
    the launch has exited; returns (log, seconds from the signal to the last exit)."""
    log = open(cwd / f"{out}.log", "w")
    proc = subprocess.Popen(command(launcher, out), cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (cwd / out / "metrics.jsonl").is_file() or max(losses(cwd / out), default=0) < 2:
            assert proc.poll() is None, (cwd / f"{out}.log").read_text()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)
        if who == "group":
            os.killpg(proc.pid, sig)
        else:
            pids = targets(proc.pid, who)
            assert pids, processes(proc.pid)
            for pid in pids:
                os.kill(pid, sig)
        t = time.time()
        while processes(proc.pid):
            if time.time() - t > 45:
                left = processes(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"processes left {time.time() - t:.0f} s after the signal: {left}")
            time.sleep(0.2)
        proc.wait(timeout=10)
        return (cwd / f"{out}.log").read_text(), time.time() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def check_stopped(cwd: Path, out: str, text: str, seconds: float) -> int:
    """A stop that lost nothing: a complete checkpoint of both ranks at the step reached, every
    process gone within DeepSpeed's 30 s grace period, no failing rank. Returns the step."""
    reached = max(losses(cwd / out))
    assert 2 <= reached < STEPS, text[-3000:]
    assert f"stopped at step {reached} on request" in text, text[-3000:]
    ckpt = cwd / out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step{reached:07d}"
    assert len(list((ckpt / f"step{reached:07d}").glob("*optim_states.pt"))) == 2  # both ranks' partitions
    assert (ckpt / f"step{reached:07d}" / "complete.json").is_file()
    assert seconds < 30, f"took {seconds:.0f} s after the signal, past the launcher's grace period"
    # deepspeed's runner prints a KeyboardInterrupt traceback of its own on Ctrl-C (its code, not
    # ours); the ranks and their workers must not fail
    assert 'run.py", line' not in text and "DataLoader worker" not in text, text[-3000:]
    return reached
