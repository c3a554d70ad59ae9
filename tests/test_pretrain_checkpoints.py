"""Checkpoints are never lost to a missing or stale ``latest``, a deleted or truncated checkpoint,
or a torn ``metrics.jsonl``; a refused launch changes nothing. Single-process runs of run.py
(the refusals happen before any process group exists, so those run in this process)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain_helpers import RUN, env, free_port, losses

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--max-steps", "6",
        "--train-batch-size", "8", "--micro-batch-size", "4", "--set", "pretrain.log_every=1",
        "--set", "pretrain.checkpoint_every=2", "--set", "pretrain.keep_checkpoints=3",
        "--set", "pretrain.num_workers=0", "--set", "pretrain.eval_samples=8"]


def run(cwd: Path, out: str, *extra: str, expect: int = 0) -> str:
    proc = subprocess.run([sys.executable, str(RUN), *ARGS, "--output", out, *extra], cwd=cwd,
                          env=dict(env(), MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == expect, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    return text


def refused(cwd: Path, out: str, *extra: str, capsys) -> str:
    """run.py in this process: it must refuse (exit 2) with one line and no traceback."""
    import pretrain.run as run_mod

    args = [str(cwd / a) if a.startswith("data/") else a for a in ARGS]
    assert run_mod.cli([*args, "--output", str(cwd / out), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def base(pretrain_work):
    work = pretrain_work
    run(work, "ckpt_base")
    tags = sorted(p.name for p in (work / "ckpt_base" / "checkpoints").glob("step*"))
    assert tags == ["step0000002", "step0000004", "step0000006"]
    return work


def copy(base: Path, name: str) -> Path:
    dst = base / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base / "ckpt_base", dst)
    return dst


def test_newest_checkpoint_deleted_resume_falls_back_and_keeps_the_rest(base):
    d = copy(base, "ckpt_deleted")
    shutil.rmtree(d / "checkpoints" / "step0000006")  # "latest" now names a missing checkpoint
    text = run(base, "ckpt_deleted", "--resume")
    assert "resumed from step0000004" in text
    assert "checkpoints/latest names step0000006, which does not exist (deleted?); resuming from step0000004" in text
    assert losses(d) == losses(base / "ckpt_base")  # steps 5 and 6 again, the same floats
    tags = sorted(p.name for p in (d / "checkpoints").glob("step*"))
    assert tags == ["step0000002", "step0000004", "step0000006"]  # nothing complete was pruned
    assert [r["step"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_empty_latest_and_a_truncated_optimizer_file_are_skipped_with_a_message(base):
    d = copy(base, "ckpt_truncated")
    (d / "checkpoints" / "latest").write_text("")
    optim_file = next((d / "checkpoints" / "step0000006").glob("*optim_states.pt"))
    with open(optim_file, "r+b") as f:
        f.truncate(optim_file.stat().st_size // 2)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # torn by a crash while writing
    text = run(base, "ckpt_truncated", "--resume")
    assert "resume: skipping step0000006" in text and "truncated" in text
    assert "resumed from step0000004" in text
    assert "dropping unreadable line" in text
    assert losses(d) == losses(base / "ckpt_base")


def test_without_resume_an_output_with_checkpoints_is_refused_and_left_as_it_was(base, capsys):
    d = copy(base, "ckpt_refused")
    (d / "checkpoints" / "latest").unlink()  # no "latest" at all: the checkpoints still count
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    text = refused(base, "ckpt_refused", "--set", "optimizer.params.lr=0.003", capsys=capsys)
    assert "already holds checkpoints (latest step0000006" in text and "pass --resume" in text
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before  # config.effective.json included: the refused launch recorded nothing


def test_resume_with_changed_settings_is_refused_and_changes_nothing(base, capsys):
    d = copy(base, "ckpt_changed")
    before = (d / "config.effective.json").read_bytes()
    text = refused(base, "ckpt_changed", "--resume", "--set", "optimizer.params.lr=0.003", capsys=capsys)
    assert "trained with different settings ['optimizer']" in text
    assert (d / "config.effective.json").read_bytes() == before


def test_resume_with_no_complete_checkpoint_says_so(base, capsys):
    d = copy(base, "ckpt_none")
    for tag in ("step0000002", "step0000004", "step0000006"):  # every one damaged after it was written
        f = next((d / "checkpoints" / tag).glob("*optim_states.pt"))
        f.write_bytes(f.read_bytes()[:100])
    text = refused(base, "ckpt_none", "--resume", capsys=capsys)
    assert "no complete checkpoint among step0000002, step0000004, step0000006" in text
