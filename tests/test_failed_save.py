"""A checkpoint that cannot be written ends the job at once, every process of it, with one line naming
the checkpoint and the cause (real ranks under ``mpiexec``, a real file size limit).

``ulimit -f`` stops a write part-way as a full disk does. It also bounds DeepSpeed's CPU all-reduce
buffer (69 MB in /dev/shm), so the limit sits above that and the model is BERT-small without ZeRO:
rank 0 writes the weights and optimizer state in one ~170 MB file and fails; rank 1 writes only its
small files and succeeds. Before, every rank printed torch's "unexpected pos" traceback and no
process exited (the ranks waited for DataLoader workers that ignore SIGTERM, or for each other)."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.pretrain_helpers import RUN, env, mpiexec, processes

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80 << 20  # bytes: above the all-reduce buffer, below rank 0's checkpoint file
ARGS = ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--max-steps", "2",
        "--train-batch-size", "16", "--micro-batch-size", "4", "--set", "pretrain.model=small",
        "--set", "pretrain.checkpoint_every=1", "--set", "zero_optimization.stage=0",
        "--set", "bf16.enabled=false", "--set", "pretrain.log_every=1"]


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_failed_save_ends_every_process_with_one_line_and_no_traceback(pretrain_work, capsys):
    cwd, out = pretrain_work, "failed_save"
    proc = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, str(RUN), *ARGS, "--output", out], cwd=cwd,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=limit_file_size)
    try:
        text, err = proc.communicate(timeout=90)  # a hang fails here
        deadline = time.time() + 10  # the DataLoader workers leave once their rank is gone
        while processes(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not processes(proc.pid), processes(proc.pid)
    finally:
        if proc.poll() is None or processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    both = text + err
    assert proc.returncode == 4, both[-3000:]
    tag_dir = f"{out}/checkpoints/step0000001"
    lines = [line for line in both.splitlines() if "step0000001" in line or "rror" in line]
    assert len(lines) == 1, both[-3000:]
    assert lines[0].startswith(f"pretrain: checkpoint save to {tag_dir} failed: RuntimeError: ")
    assert lines[0].endswith(f"(file size limit {LIMIT:,} bytes, ulimit -f)")
    assert "Traceback" not in both and "checkpoint: " not in both  # no checkpoint announced
    assert not (cwd / tag_dir / "complete.json").exists()

    # Recovery: the unfinished save is not resumed from, and the first new save removes it.
    from pretrain.config import PretrainConfig
    from pretrain.run import check_output

    cfg = PretrainConfig(data="d", output=str(cwd / out))
    capsys.readouterr()
    assert check_output(SimpleNamespace(resume=True), cfg, {}, {}) is False
    assert "only unfinished saves (step0000001: removed by the first save) in " in \
        capsys.readouterr().out
