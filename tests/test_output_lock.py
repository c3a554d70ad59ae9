"""One run per ``--output``: a second launch into an output another run is writing exits 2 with one
line naming the directory and the holder, and leaves the first run's files alone; a lock whose
holder died (SIGKILL) is free and taken over with a message (pretrain/outdir.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import outdir
from tests.pretrain_helpers import RUN, env, free_port, losses

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--max-steps", "5000",
        "--train-batch-size", "8", "--micro-batch-size", "4", "--set", "pretrain.log_every=1",
        "--set", "pretrain.checkpoint_every=0", "--set", "pretrain.num_workers=0", "--set", "pretrain.eval_samples=8"]


def launch(cwd: Path, out: str, seed: int, **kw):
    cmd = [sys.executable, str(RUN), *ARGS, "--output", out, "--seed", str(seed)]
    return subprocess.Popen(cmd, cwd=cwd, env=dict(env(), MASTER_PORT=str(free_port())), text=True, **kw)


@pytest.mark.slow
def test_a_second_launch_into_a_held_output_is_refused_and_the_first_run_is_intact(pretrain_work):
    cwd, out = pretrain_work, "lock_shared"
    first = launch(cwd, out, 1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (cwd / out / "metrics.jsonl").is_file() or not losses(cwd / out):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline, "the first run did not start training"
            time.sleep(0.1)
        second = launch(cwd, out, 2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            text, err = second.communicate(timeout=60)
        finally:
            second.kill()
        assert second.returncode == 2, text[-2000:] + err[-2000:]
        assert err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert f"{out} is in use by another run (pid {first.pid} on host {socket.gethostname()}" in err, err
        assert first.poll() is None  # the first run went on
        first.send_signal(signal.SIGTERM)
        log = first.communicate(timeout=60)[0]
        assert first.returncode == 0 and "stopped at step" in log, log[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    run_dir = cwd / out
    assert json.loads((run_dir / "config.effective.json").read_text())["pretrain"]["seed"] == 1  # the first's
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines: each step once
    assert len(list((run_dir / "tensorboard").glob("events.*"))) <= 1
    assert [p.name for p in (run_dir / "checkpoints").glob("step*")] == [f"step{steps[-1]:07d}"]
    assert (run_dir / ".lock").read_text() == ""  # released on the way out: the next --resume finds it free


HOLD = """
import sys, time
from pretrain.outdir import OutputLock
print(OutputLock(sys.argv[1]).acquire(), flush=True)
time.sleep(60)
"""


def test_the_lock_of_a_killed_run_is_free_and_taken_over_with_a_message(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "(None, None)"  # free: taken, nothing to take over
        who = outdir.holder(out)
        assert who is not None and who.startswith(f"pid {child.pid} on host {socket.gethostname()}, started ")
        assert outdir.OutputLock(out).acquire(wait=0.2) == (who, None)
        child.send_signal(signal.SIGKILL)  # no clean-up of any kind
        child.wait(timeout=10)
        assert outdir.holder(out) is None
        lock = outdir.OutputLock(out)
        taken, note = lock.acquire()
        assert taken is None and note == f"{who}, which has ended without releasing it"
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert (out / ".lock").read_text() == ""
    finally:
        child.kill()


def test_a_record_naming_a_live_process_here_refuses_even_where_locks_are_not_honoured(tmp_path):
    # NFS without lockd: every lock "succeeds"; the record of a live process on this host still counts
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        record = {"pid": sleeper.pid, "host": socket.gethostname(), "ticks": ticks, "started": "then"}
        (tmp_path / ".lock").write_text(json.dumps(record))
        want = f"pid {sleeper.pid} on host {socket.gethostname()}, started then"
        assert outdir.holder(tmp_path) == want
        assert outdir.OutputLock(tmp_path).acquire(wait=0) == (want, None)
        (tmp_path / ".lock").write_text(json.dumps(dict(record, ticks=ticks + 1)))  # the pid reused since
        assert outdir.holder(tmp_path) is None
    finally:
        sleeper.kill()
