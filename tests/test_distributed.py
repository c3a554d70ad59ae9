"""The process group leaves nothing behind in /dev/shm, however its ranks end.

DeepSpeed's CPU all-reduce creates one shared-memory file per rank and never removes it; on a
machine that runs many CPU jobs (tests, the scaling grid) they filled /dev/shm. The control run
(DeepSpeed's own init) shows the files appear; ``pretrain.distributed.init_distributed`` must
leave none, even when the ranks die without cleanup, and the shared-memory all-reduce must still
sum correctly after the names are gone.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.distributed import SHM_DIR, SHM_PREFIX
from tests.pretrain_helpers import ROOT, env, free_port

pytestmark = [pytest.mark.distributed]

WORKER = Path(__file__).parent / "distributed" / "shm_worker.py"


def launch(out: Path, *extra: str) -> tuple[list[dict], list[str]]:
    """Each rank's report and the shared-memory files of this launch left behind."""
    port = free_port()
    out.mkdir()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(WORKER), "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    left = glob.glob(os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"))
    return reports, left


@pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm")
def test_two_ranks_leave_no_shared_memory_files(tmp_path):
    control, leaked = launch(tmp_path / "raw", "--raw")
    for path in leaked:  # the control's leak is ours to clean
        os.unlink(path)
    if not leaked:
        pytest.skip("this DeepSpeed build does not use its shared-memory all-reduce here")
    assert len(leaked) == 2 and all(r["exists_after_init"] for r in control)

    reports, left = launch(tmp_path / "ours")
    assert left == []
    for r in reports:
        assert r["world"] == 2 and not r["exists_after_init"]
        # ranks hold 1 and 2: the all-reduce still works through the unlinked mappings
        assert r["sum"] == 3.0 and r["min"] == 3.0
