"""A preempted job requeued on another number of ranks resumes where it stopped, nothing lost.

Phase 1 runs straight on 2 ranks (``mpiexec``, ZeRO-2, checkpoints every 2 steps). Its step-2
checkpoint is resumed on 1 rank (fewer nodes came back), and that run's step-4 checkpoint on 2
ranks again (more did). Each continues the straight run: the same samples in every step (the
sampler's position converted), the fp32 master weights, LAMB's moments and step count
re-partitioned exactly. With dropout off (a model config.json with zero dropout: dropout draws
are per rank) and micro-batches of one sample (larger ones would group a step's samples
differently on 1 and 2 ranks, and a micro-batch's loss is a mean over its masked tokens), the
losses and weights equal the straight run's up to the order of floating-point sums (1 rank
accumulates 16 micro-batches where 2 ranks accumulate 8 each).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain_helpers import ROOT, RUN, env, free_port, losses, mpiexec

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def args(model: Path, out: str) -> list[str]:
    return ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--model", str(model),
            "--max-steps", "6", "--train-batch-size", "16", "--micro-batch-size", "1", "--output", out,
            "--set", "pretrain.log_every=1", "--set", "pretrain.checkpoint_every=2",
            "--set", "pretrain.keep_checkpoints=3", "--set", "pretrain.eval_samples=8",
            "--set", "pretrain.num_workers=0", "--set", "bf16.enabled=false"]


def launch(cwd: Path, ranks: int, *argv: str) -> str:
    cmd = ([mpiexec(), "-n", "2"] if ranks == 2 else []) + [sys.executable, str(RUN), *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=dict(env(), MASTER_PORT=str(free_port())), capture_output=True,
                          text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in text, text[-4000:]
    return text


def partitions(run_dir: Path, tag: str) -> int:
    return len(list((run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*_optim_states.pt")))


def weights(run_dir: Path, tag: str) -> dict:
    from pretrain.checkpoint import fp32_state_dict

    return fp32_state_dict(run_dir / "checkpoints", tag)


def resume_from(cwd: Path, source: str, tag: str, out: str) -> Path:
    """``out``: a copy of ``source`` as a job killed right after ``tag`` would have left it."""
    dst = cwd / out
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(cwd / source, dst)
    for ckpt in (dst / "checkpoints").glob("step*"):
        if ckpt.name > tag:
            shutil.rmtree(ckpt)
    return dst


def test_resume_on_fewer_then_more_ranks_continues_the_straight_run(pretrain_work):
    from pretrain.model import bert_config

    vocab = json.loads((pretrain_work / "data" / "seq128" / "manifest.json").read_text())["vocab"]["size"]
    cfg = bert_config("bert-tiny", vocab).to_dict()
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = pretrain_work / "tiny_no_dropout.json"
    model.write_text(json.dumps(cfg))

    launch(pretrain_work, 2, *args(model, "rs_straight"))
    straight = losses(pretrain_work / "rs_straight")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and partitions(pretrain_work / "rs_straight", "step0000002") == 2

    fewer = resume_from(pretrain_work, "rs_straight", "step0000002", "rs_fewer")
    text = launch(pretrain_work, 1, *args(model, "rs_fewer"), "--resume")
    assert ("resumed from step0000002 (written by 2 ranks: optimizer state re-partitioned onto 1, "
            "data position converted" in text), text[-3000:]
    assert partitions(fewer, "step0000004") == 1

    more = resume_from(pretrain_work, "rs_fewer", "step0000004", "rs_more")
    text = launch(pretrain_work, 2, *args(model, "rs_more"), "--resume")
    assert "resumed from step0000004 (written by 1 rank: optimizer state re-partitioned onto 2" in text, text[-3000:]

    for run_dir, first in ((fewer, 3), (more, 5)):
        got = losses(run_dir)
        assert sorted(got) == [1, 2, 3, 4, 5, 6]
        for step in range(first, 7):
            assert got[step] == pytest.approx(straight[step], rel=1e-6, abs=0), (run_dir.name, step)
    # Every weight as the straight run's but the attention key biases: their gradient is zero in
    # exact arithmetic (a constant added to a row of attention scores leaves the softmax as it
    # is), so it is rounding noise, which LAMB's normalised step turns into a full-sized step in
    # a direction of its own in every run (2 straight runs summing in other orders differ alike).
    want = weights(pretrain_work / "rs_straight", "step0000006")
    for run_dir in (fewer, more):
        got = weights(run_dir, "step0000006")
        assert got.keys() == want.keys()
        checked = [n for n in want if not n.endswith("attention.self.key.bias")]
        assert len(checked) == len(want) - 2
        for name in checked:
            assert ((got[name] - want[name]).norm() / want[name].norm()).item() < 1e-6, (run_dir.name, name)
