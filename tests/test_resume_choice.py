"""Rank 0 reads the checkpoint directory and decides; every rank follows (pretrain/checkpoint.py).

On NFS with client-side caching the ranks of a requeued job can list different newest checkpoints.
Two real ranks in a process group each get their own view of the checkpoints: rank 1's view lacks
the newest checkpoint (resume) or shows it unfinished (a save of a step saved already). Both must
take rank 0's view: load the same tag, skip the same save. The engine is a stand-in that records
what it was asked to load (a real engine's load is what the e2e resume tests check)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.pretrain_helpers import env, free_port

RANK = r"""
import json, sys
from pathlib import Path
import torch
from pretrain import checkpoint
from pretrain.distributed import init_distributed

class StandIn:
    device = torch.device("cpu")
    def load_checkpoint(self, ckpt_dir, tag, **kw):
        return None, {"step": int(tag[4:]), "samples": 0}
    def save_checkpoint(self, *a, **kw):
        raise AssertionError("a saved step was written again")

rank, world = init_distributed()
view = Path(sys.argv[1]) / f"view{rank}"
client = checkpoint.load_resume(StandIn(), view, announce=rank == 0)
saved = checkpoint.save(StandIn(), view, 6, {}, "{}", keep=3)
print(json.dumps({"rank": rank, "loaded": client["_tag"], "save_returned": saved.name}), flush=True)
# leave together: a rank exiting while its peer still talks to it can abort in gloo's threads
import deepspeed.comm as dist
dist.barrier()
torch.distributed.destroy_process_group()
"""


def make(ckpt: Path, step: int, world: int, complete: bool = True) -> None:
    d = ckpt / f"step{step:07d}"
    d.mkdir(parents=True)
    torch.save({"dp_world_size": world}, d / "mp_rank_00_model_states.pt")
    for r in range(world):
        torch.save({}, d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    if complete:
        files = {p.name: p.stat().st_size for p in d.iterdir()}
        (d / "complete.json").write_text(json.dumps({"step": step, "files": files}))


def test_every_rank_loads_and_skips_what_rank_0_sees(tmp_path):
    for rank in (0, 1):
        ckpt = tmp_path / f"view{rank}" / "checkpoints"
        make(ckpt, 2, world=2)
        make(ckpt, 4, world=2)
        (ckpt / "latest").write_text("step0000006")
    make(tmp_path / "view0" / "checkpoints", 6, world=2)                  # rank 0 sees step 6 complete
    make(tmp_path / "view1" / "checkpoints", 6, world=2, complete=False)  # rank 1's cache: unfinished
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=90)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    assert [r["loaded"] for r in results] == ["step0000006", "step0000006"]
    assert [r["save_returned"] for r in results] == ["step0000006", "step0000006"]


def test_a_latest_naming_a_deleted_checkpoint_falls_back_with_a_message(tmp_path, capsys):
    from pretrain.checkpoint import stale_latest

    ckpt = tmp_path / "checkpoints"
    make(ckpt, 4, world=1)
    assert stale_latest(ckpt, "step0000004") == f"{ckpt / 'latest'} is missing"
    (ckpt / "latest").write_text("step0000006")  # step 6 deleted by hand
    assert stale_latest(ckpt, "step0000004") == f"{ckpt / 'latest'} names step0000006, which does not exist (deleted?)"
    (ckpt / "latest").write_text("step0000004")
    assert stale_latest(ckpt, "step0000004") is None
