"""One rank of the /dev/shm test: start the group the way run.py does, all-reduce through
DeepSpeed's shared-memory kernel after the names are gone, then die without any cleanup."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from pretrain.distributed import init_distributed, shm_buffer_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_argument("--raw", action="store_true", help="DeepSpeed's own init, as a control")
    args = ap.parse_args()
    import deepspeed
    import deepspeed.comm as dist

    if args.raw:
        deepspeed.init_distributed()
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = init_distributed()

    x = torch.full((1 << 16,), float(rank + 1))
    dist.inference_all_reduce(x)
    report = {"rank": rank, "world": world, "sum": x[0].item(), "min": x.min().item(),
              "path": shm_buffer_path(rank), "exists_after_init": os.path.exists(shm_buffer_path(rank))}
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    os._exit(0)  # as a killed rank would: no atexit, no destructor


if __name__ == "__main__":
    main()
