"""Nothing lost on a stop request, however the launcher delivers it (real processes, real signals).

Each case starts phase 1 on 2 CPU ranks (bert-tiny, a DataLoader worker per rank), waits until
training is under way, and delivers one signal the way a user, a scheduler or a launcher would:
to the ``deepspeed`` runner alone (it exits at once and leaves the ranks running; the ranks'
watch of the launchers above them covers ``launch.py`` and ``mpiexec`` dying the same way), to
the ranks alone (Slurm's
``--signal=USR1``), or to the whole process group (``kill -TERM -PGID``). Each must end in a
complete checkpoint at the step reached and every process gone within DeepSpeed's 30 s grace
period. Ctrl-C (SIGINT to the group) is the ``phase1`` fixture's own stop, checked here too; its
resume repeats the uninterrupted run bitwise (test_pretrain_e2e.py).
"""
from __future__ import annotations

import json
import signal

import pytest

from tests.pretrain_helpers import check_stopped, interrupted_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CASES = [
    ("deepspeed", "runner", signal.SIGTERM),  # the runner alone exits at once; ranks must notice
    ("deepspeed", "ranks", signal.SIGUSR1),   # Slurm --signal=USR1@T to the job steps
    ("mpi", "group", signal.SIGTERM),         # kill -TERM -PGID of an mpiexec job
]


@pytest.mark.parametrize("launcher,who,sig", CASES, ids=[f"{a}-{b}-{c.name}" for a, b, c in CASES])
def test_a_signal_ends_in_a_checkpoint_and_a_clean_exit(pretrain_work, launcher, who, sig):
    out = f"sig_{launcher}_{who}_{sig.name}"
    text, seconds = interrupted_run(pretrain_work, launcher, who, sig, out)
    check_stopped(pretrain_work, out, text, seconds)


def test_ctrl_c_ends_in_a_checkpoint_and_a_clean_exit(phase1):
    text = (phase1 / "resumed.log").read_text()  # the stopped half of the "resumed" run
    seconds = json.loads((phase1 / "resumed.stop.json").read_text())["seconds"]
    assert "received SIGINT" in text
    # the resume has written newer checkpoints since: check the stop's own one by its log line
    import re

    reached = int(re.search(r"stopped at step (\d+) on request", text).group(1))
    assert f"checkpoint: resumed/checkpoints/step{reached:07d}" in text
    assert seconds < 30 and 'run.py", line' not in text and "DataLoader worker" not in text


def test_a_signal_to_one_rank_is_reported_as_what_it_was(pretrain_work):
    """SIGTERM to rank 1 alone (an OOM killer's neighbour, a user's kill PID): every rank stops at the
    same step with a checkpoint, and the message names the signal and the rank, not --stop-after."""
    import os
    import subprocess
    import time
    from pathlib import Path

    from tests.pretrain_helpers import command, env, losses, processes

    cwd, out = pretrain_work, "sig_one_rank"
    log = open(cwd / f"{out}.log", "w")
    proc = subprocess.Popen(command("deepspeed", out), cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (cwd / out / "metrics.jsonl").is_file() or max(losses(cwd / out), default=0) < 2:
            assert proc.poll() is None and time.time() < deadline, (cwd / f"{out}.log").read_text()[-3000:]
            time.sleep(0.05)
        procs = processes(proc.pid)
        launch = [p for p, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
        rank1 = [p for p, cmd in procs.items() if "run.py --local_rank=1 " in cmd  # as launch.py starts it,
                 and int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == launch[0]]  # not its worker
        assert len(rank1) == 1, procs
        os.kill(rank1[0], signal.SIGTERM)
        t = time.time()
        proc.wait(timeout=45)
        seconds = time.time() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = (cwd / f"{out}.log").read_text()
    reached = check_stopped(cwd, out, text, seconds)
    assert f"stopped at step {reached} on request (rank 1: received SIGTERM)" in text, text[-3000:]
