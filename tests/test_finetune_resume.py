"""Fine-tuning on 2 ranks, and nothing lost when it is stopped: a real SIGTERM to one rank only of
a run under the DeepSpeed launcher (the other must stop at the same step), a checkpoint, and
``--resume`` under ``mpiexec`` ending in the predictions, scores, evaluations and weights of the
uninterrupted run (also under ``mpiexec``: a job requeued under another launcher resumes alike,
and the test spends no time on the DeepSpeed launcher's two Python processes where it is not the
subject).

The run is chosen to cross the awkward places: 52 questions give 137 windows, 69 per rank (one
padded), so each epoch ends on a micro-batch of one and has 35 micro-batches, an odd number,
so with 2 accumulation steps step 18 accumulates across the epoch boundary. An
evaluation at every step means the stop always lands on a step due for one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.data import read_squad
from tests.pretrain_helpers import free_port, mpiexec
from tests.test_finetune_squad import ENV, ROOT, SCRIPT, SMALL, _check_outputs

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
PREDICT = 16
STEPS = 20
# one thread per rank: two ranks of two threads on two cores spin in each other's way (5 s a step
# instead of 0.3)
ENV1 = dict(ENV, OMP_NUM_THREADS="1")


def launcher() -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]


def mpi() -> list[str]:
    return [mpiexec(), "-n", "2", sys.executable]


def args(shared_data, ckpt, out: Path, *extra) -> list[str]:
    train = shared_data / "squad" / "train-v1.1-articles-00-43.json"
    dev = shared_data / "squad" / "dev-v1.1-articles-00-23.json"
    return [str(a) for a in ["--checkpoint", ckpt, "--train-file", train, "--predict-file", dev, "--output", out,
                             "--max-train-examples", 52, "--max-predict-examples", PREDICT, *SMALL, "--epochs", 100,
                             "--max-steps", STEPS, "--grad-accum", 2, "--eval-every", 1, "--checkpoint-every", 4,
                             "--save-model", *extra]]


def run(cmd: list[str], expect: int = 0) -> str:
    """Run to the end; a port of its own (mpiexec's ranks would otherwise take DeepSpeed's default)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(ENV1, MASTER_PORT=str(free_port())),
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-4000:]
    return out


def rank_pids(session: int) -> list[int]:
    """The rank processes of the launch started as session ``session`` (python ... squad.py --local_rank=N)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            if b"squad.py" in cmd and b"--local_rank" in cmd and os.getsid(int(d.name)) == session:
                found.append(int(d.name))
        except OSError:
            continue
    return sorted(found)


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def test_a_signal_to_one_rank_saves_and_resume_repeats_the_straight_run(shared_data, tiny_checkpoint, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(mpi() + [str(SCRIPT)] + args(shared_data, tiny_checkpoint, straight))
    dev = read_squad(shared_data / "squad" / "dev-v1.1-articles-00-23.json").examples[:PREDICT]
    _, metrics = _check_outputs(straight, dev)  # two ranks predict shards; rank 0 writes them all
    assert metrics["world_size"] == 2 and metrics["train_windows"] == 137

    cmd = launcher() + [str(SCRIPT)] + args(shared_data, tiny_checkpoint, stopped)
    with (tmp_path / "stopped.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV1, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    first = stopped / "checkpoints" / "step0000004" / "complete.json"
    deadline = time.time() + 300
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.is_file(), (tmp_path / "stopped.log").read_text()[-3000:]
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)  # one rank only: the other learns it through the step's all-reduce
    rc = proc.wait(timeout=120)
    text = (tmp_path / "stopped.log").read_text()
    assert rc == 0, text[-3000:]
    assert "on request (made on another rank); rerun with --resume" in text
    saved = sorted(p.name for p in (stopped / "checkpoints").glob("step*"))
    assert len(saved) == 1 and (stopped / "checkpoints" / saved[0] / "complete.json").is_file()
    step = int(saved[0][4:])
    assert 5 <= step < STEPS  # one step after the request at the earliest
    assert not (stopped / "predictions.json").exists() and not (stopped / "metrics.json").exists()

    # the same command without --resume is refused, naming the way on (one process: refused alike)
    refused = run([sys.executable, str(SCRIPT)] + args(shared_data, tiny_checkpoint, stopped), expect=2)
    assert "pass --resume" in refused
    # another learning rate is another run
    other = run([sys.executable, str(SCRIPT)] + args(shared_data, tiny_checkpoint, stopped, "--resume", "--lr", "2e-3"),
                expect=2)
    assert "other settings (lr)" in other

    resumed = run(mpi() + [str(SCRIPT)] + args(shared_data, tiny_checkpoint, stopped, "--resume"))
    assert f"resumed from {saved[0]}: step {step}" in resumed
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((stopped / "metrics.json").read_text())
    assert b["resumed"] is True and a["train_steps"] == b["train_steps"] == STEPS
    assert a["train_windows_seen"] == b["train_windows_seen"]
    assert (a["exact_match"], a["f1"]) == (b["exact_match"], b["f1"])
    assert [e["step"] for e in a["eval_during_training"]] == list(range(1, STEPS + 1))
    assert a["eval_during_training"] == b["eval_during_training"]  # the one due at the stop done on resuming
    assert json.loads((straight / "predictions.json").read_text()) == json.loads((stopped / "predictions.json").read_text())
    wa, wb = weights(straight), weights(stopped)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert not (stopped / "checkpoints").exists()  # spent once the results are written
    # a requeued job (the same command with --resume) finds the run finished and leaves it alone
    again = run([sys.executable, str(SCRIPT)] + args(shared_data, tiny_checkpoint, stopped, "--resume"))
    assert "nothing to do" in again
    assert json.loads((stopped / "metrics.json").read_text()) == b
