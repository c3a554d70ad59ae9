"""A rank that crashes mid-training exits at once with what happened, instead of waiting at
interpreter exit for its DataLoader workers (they ignore SIGTERM; the process hung until SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pretrain_helpers import PHASE1, env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_crash_mid_training_exits_within_seconds(pretrain_work, tmp_path):
    out = tmp_path / "crash"
    cmd = [sys.executable, str(ROOT / "tests" / "crash_run.py"), "5", *PHASE1, "--output", str(out),
           "--set", "pretrain.num_workers=2"]
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=pretrain_work, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the crashed run did not exit within 120 s (waiting for its DataLoader workers)")
    assert proc.returncode == 1, stderr[-3000:]
    assert "pretrain: rank 0 failed: RuntimeError: injected fault in forward" in stderr
    assert time.time() - t < 110
