"""Optimizer and scheduler values that cannot train are refused before anything starts: one line
naming the key and the value, exit 2, no output directory (lr 0 used to train and save silently)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "ds_configs" / "cpu_seq128.json"


def test_run_py_refuses_lr_0_in_one_line_before_creating_the_output(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "pretrain" / "run.py"), "--config", str(CPU_CONFIG),
                        "--data", str(tmp_path / "data" / "seq128"), "--output", str(out),
                        "--set", "optimizer.params.lr=0"],
                       cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"pretrain: {CPU_CONFIG}: optimizer.params.lr must be a finite number > 0, got 0"]
    assert not out.exists()


@pytest.mark.parametrize("assignment,message", [
    ("optimizer.params.lr=-0.001", "optimizer.params.lr must be a finite number > 0, got -0.001"),
    ("optimizer.params.lr=NaN", "optimizer.params.lr must be a finite number > 0, got nan"),
    ("optimizer.params.lr=Infinity", "optimizer.params.lr must be a finite number > 0, got inf"),
    ("optimizer.params.lr=fast", "optimizer.params.lr must be a finite number > 0, got 'fast'"),
    ("optimizer.params.weight_decay=-0.01", "optimizer.params.weight_decay must be a finite number >= 0, got -0.01"),
    ("optimizer.params.eps=-1e-6", "optimizer.params.eps must be a finite number >= 0, got -1e-06"),
    ("optimizer.params.betas=[0.9,1.0]", "optimizer.params.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("scheduler.params.warmup_proportion=1.5", "scheduler.params.warmup_proportion must be a finite number in "
                                               "[0, 1], got 1.5"),
    ("scheduler.params.power=-0.5", "scheduler.params.power must be a finite number >= 0, got -0.5"),
    ("scheduler.params.warmup_max_lr=0", "scheduler.params.warmup_max_lr must be a finite number > 0, got 0"),
])
def test_meaningless_optimizer_and_scheduler_values_are_named(assignment, message):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(CPU_CONFIG, {"data": "data/seq128"}, [assignment])
    assert str(e.value) == f"{CPU_CONFIG}: {message}"


def test_values_at_the_edge_of_sense_still_load(tmp_path):
    """No weight decay, no warmup, a constant lr after warmup (power 0): legitimate choices."""
    ds, _ = config_mod.load(CPU_CONFIG, {"data": "data/seq128"},
                            ["optimizer.params.weight_decay=0", "scheduler.params.warmup_proportion=0",
                             "scheduler.params.power=0", "optimizer.params.lr=1e-5"])
    assert ds["optimizer"]["params"]["lr"] == 1e-5 and ds["scheduler"]["params"]["power"] == 0
    shipped = json.loads(CPU_CONFIG.read_text())["optimizer"]["params"]["lr"]
    assert config_mod.load(CPU_CONFIG, {"data": "d"})[0]["optimizer"]["params"]["lr"] == shipped


@pytest.mark.parametrize("assignment,message", [
    # a string passed validation (int("5") is 5) and then failed at step 1 with a TypeError
    ('pretrain.log_every="5"', "pretrain.log_every must be a positive integer, got '5'"),
    ('pretrain.max_steps="ten"', "pretrain.max_steps must be a positive integer, got 'ten'"),
    ("pretrain.checkpoint_every=2.5", "pretrain.checkpoint_every must be an integer >= 0, got 2.5"),
    ("pretrain.eval_every=true", "pretrain.eval_every must be an integer >= 0, got True"),
    ('pretrain.gns_ema="0.9"', "pretrain.gns_ema must be in [0, 1), got '0.9'"),
])
def test_pretrain_values_of_the_wrong_type_are_named(assignment, message):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(CPU_CONFIG, {"data": "data/seq128"}, [assignment])
    assert str(e.value) == f"{CPU_CONFIG}: {message}"


def test_a_config_without_an_optimizer_is_named(tmp_path):
    cfg = json.loads(CPU_CONFIG.read_text())
    del cfg["optimizer"]
    path = tmp_path / "no_optimizer.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(config_mod.ConfigError, match=r"no_optimizer.json: no optimizer block with a \"type\""):
        config_mod.load(path, {"data": "data/seq128"})
