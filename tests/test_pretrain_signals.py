"""Nothing lost on a stop request, however the launcher delivers it (real processes, real signals).

Each case starts phase 1 on 2 CPU ranks (bert-tiny, a DataLoader worker per rank), waits until
training is under way, delivers one signal the way a user, a scheduler or a launcher would (to
the whole process group as Ctrl-C and ``kill -TERM -PGID`` do, to the ``deepspeed`` runner or
``mpiexec`` alone, to DeepSpeed's ``launch.py``, to the ranks alone as Slurm's
``--signal=USR1`` does), and checks that the run saved a checkpoint at the step it reached and
that every process exited within DeepSpeed's 30 s grace period. One case then resumes and must
repeat the losses of an uninterrupted run exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_pretrain_e2e import RUN, env, free_port, losses, work  # noqa: F401 - work is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
ARGS = ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--max-steps", str(STEPS),
        "--train-batch-size", "16", "--micro-batch-size", "4", "--set", "pretrain.log_every=1",
        "--set", "pretrain.checkpoint_every=0", "--set", "pretrain.num_workers=1",
        "--set", "pretrain.validation_shards=1", "--set", "pretrain.eval_samples=8"]


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    return found


def command(launcher: str, out: str, *extra: str) -> list[str]:
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), str(RUN), *ARGS, "--output", out, *extra]
    return [mpiexec(), "-n", "2", sys.executable, str(RUN), *ARGS, "--output", out, *extra]


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


def targets(proc: subprocess.Popen, who: str) -> list[int]:
    procs = processes(proc.pid)
    if who == "runner":
        return [proc.pid]
    if who == "launch":
        return [p for p, c in procs.items() if "deepspeed.launcher.launch" in c]
    if who == "ranks":  # run.py processes whose parent is not a run.py process (not the DataLoader workers)
        ranks = [p for p, c in procs.items() if "run.py" in c]
        parent = {p: int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in ranks}
        return [p for p in ranks if parent[p] not in ranks]
    raise ValueError(who)


def interrupted_run(cwd: Path, launcher: str, who: str, sig: signal.Signals, out: str) -> tuple[str, float]:
    log = open(cwd / f"{out}.log", "w")
    proc = subprocess.Popen(command(launcher, out), cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while max(losses(cwd / out), default=0) < 2 if (cwd / out / "metrics.jsonl").is_file() else True:
            assert proc.poll() is None, (cwd / f"{out}.log").read_text()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.1)
        if who == "group":
            os.killpg(proc.pid, sig)
        else:
            pids = targets(proc, who)
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


CASES = [
    ("deepspeed", "group", signal.SIGINT),    # Ctrl-C in the terminal (kill -TERM -PGID works alike)
    ("deepspeed", "runner", signal.SIGTERM),  # the runner alone exits at once; ranks must notice
    ("deepspeed", "launch", signal.SIGUSR1),  # launch.py dies of SIGUSR1 (no handler)
    ("deepspeed", "ranks", signal.SIGUSR1),   # Slurm --signal=USR1@T to the job steps
    ("mpi", "group", signal.SIGTERM),
    ("mpi", "runner", signal.SIGINT),         # mpiexec alone
]


_DONE: dict = {}


def case_run(work: Path, launcher: str, who: str, sig: signal.Signals) -> tuple[str, str, float]:
    """(output dir name, log text, seconds to exit) of a case, run once per module."""
    out = f"sig_{launcher}_{who}_{sig.name}"
    if out not in _DONE:
        _DONE[out] = (out, *interrupted_run(work, launcher, who, sig, out))
    return _DONE[out]


@pytest.mark.parametrize("launcher,who,sig", CASES, ids=[f"{a}-{b}-{c.name}" for a, b, c in CASES])
def test_a_signal_ends_in_a_checkpoint_and_a_clean_exit(work, launcher, who, sig):  # noqa: F811
    out, text, seconds = case_run(work, launcher, who, sig)
    reached = max(losses(work / out))
    assert 2 <= reached < STEPS, text[-3000:]
    assert f"stopped at step {reached} on request" in text, text[-3000:]
    ckpt = work / out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step{reached:07d}"
    assert len(list((ckpt / f"step{reached:07d}").glob("*optim_states.pt"))) == 2  # both ranks' partitions
    assert seconds < 30, f"took {seconds:.0f} s after the signal, past the launcher's grace period"
    # deepspeed's runner prints a KeyboardInterrupt traceback of its own on Ctrl-C (its code, not
    # ours); the ranks and their workers must not fail
    assert 'run.py", line' not in text and "DataLoader worker" not in text, text[-3000:]


def test_resume_after_ctrl_c_repeats_the_uninterrupted_losses(work):  # noqa: F811
    out, _, _ = case_run(work, "deepspeed", "group", signal.SIGINT)
    stopped = max(losses(work / out))
    done = subprocess.run(command("deepspeed", out, "--resume"), cwd=work, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    straight = subprocess.run(command("deepspeed", "ctrl_c_straight"), cwd=work, env=env(), capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-3000:]
    a, b = losses(work / "ctrl_c_straight"), losses(work / out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert stopped < STEPS
    assert a == b  # bitwise: the steps after the resume included
