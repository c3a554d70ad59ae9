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


MID = ["--config", "{root}/ds_configs/cpu_seq128.json", "--data", "data/seq128", "--max-steps", "4",
       "--train-batch-size", "128", "--micro-batch-size", "4", "--set", "pretrain.log_every=1",
       "--set", "pretrain.checkpoint_every=0", "--set", "pretrain.eval_every=0", "--set", "pretrain.eval_samples=8",
       "--set", "bf16.enabled=false"]


def test_a_stop_mid_step_drops_the_step_saves_the_last_complete_one_and_resumes_equal(pretrain_work):
    """32 micro-batches per step: a SIGTERM early in step 3 is agreed at the next micro-batch, step 3
    is dropped and step 2 saved (the stop no longer waits for the end of a step, which at a 64k
    batch takes longer than a launcher's grace); the resumed run repeats an uninterrupted one."""
    import os
    import subprocess
    import sys
    import time

    from tests.pretrain_helpers import ROOT, RUN, env, free_port, losses

    cwd = pretrain_work
    args = [a.format(root=ROOT) for a in MID]

    def launch(out, *extra, **kw):
        return subprocess.Popen([sys.executable, str(RUN), *args, "--output", out, *extra], cwd=cwd,
                                env=dict(env(), MASTER_PORT=str(free_port())), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kw)

    straight = launch("mid_straight")
    stopped = launch("mid_stopped")
    try:
        deadline = time.time() + 120
        while not (cwd / "mid_stopped/metrics.jsonl").is_file() or max(losses(cwd / "mid_stopped"), default=0) < 2:
            assert stopped.poll() is None and time.time() < deadline, stopped.stdout.read()[-3000:]
            time.sleep(0.02)
        stopped.send_signal(signal.SIGTERM)  # step 3 has just begun
        text = stopped.communicate(timeout=60)[0]
        assert straight.wait(timeout=120) == 0, straight.stdout.read()[-3000:]
    finally:
        for p in (straight, stopped):
            if p.poll() is None:
                p.kill()
    assert stopped.returncode == 0, text[-3000:]
    assert "stopped at step 2 on request (received SIGTERM); step 3 dropped after " in text, text[-3000:]
    ckpt = cwd / "mid_stopped" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000002"] and (ckpt / "step0000002/complete.json").is_file()
    assert max(losses(cwd / "mid_stopped")) == 2  # step 3 was never taken
    resumed = launch("mid_stopped", "--resume")
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0 and "resumed from step0000002" in out, out[-3000:]
    assert losses(cwd / "mid_stopped") == losses(cwd / "mid_straight")  # the same floats, step for step
    assert os.path.isfile(ckpt / "step0000004" / "complete.json")
