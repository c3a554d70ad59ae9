"""One way to start the process group, for pretraining and fine-tuning alike.

Under a launcher (``deepspeed``, ``torchrun``: RANK and friends in the environment) or ``mpiexec``
(ranks found through mpi4py by DeepSpeed) the launcher decides. A plain ``python`` run is a world
of one; it binds a free port unless MASTER_PORT says otherwise, so several single-process runs
can share a machine.

On CPUs DeepSpeed's shared-memory all-reduce maps one file per rank under /dev/shm (69 MB in
DeepSpeed 0.19) and never unlinks it, so every CPU run used to leave its ranks' files behind
until the disk filled. ``init_distributed`` unlinks them as soon as every rank has mapped every
other's: the mappings live on until the processes exit, however they exit (SIGKILL included).
"""
from __future__ import annotations

import os
import socket

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "PMIX_RANK")


def launched() -> bool:
    return "RANK" in os.environ or any(k in os.environ for k in MPI_VARS)


def init_distributed() -> tuple[int, int]:
    """(rank, world size), with DeepSpeed's process group started."""
    import deepspeed
    import deepspeed.comm as dist

    port = os.environ.get("MASTER_PORT")
    if not launched():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = str(s.getsockname()[1])
            os.environ["MASTER_PORT"] = port
    deepspeed.init_distributed(distributed_port=int(port or 29500), verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    release_shm_buffer(rank, world)
    return rank, world


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU all-reduce keeps this rank's workspace (named as its shm.cpp does:
    user id, MASTER_ADDR, MASTER_PORT, rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_buffer(rank: int, world: int) -> bool:
    """Unlink this rank's all-reduce workspace once every rank holds its mappings; True if one
    was there. DeepSpeed opens every peer's file before its process-group init returns, so after
    a barrier no rank needs the names any more. Every rank calls this (the barrier is collective);
    off CPUs the file does not exist and only the barrier runs."""
    import deepspeed.comm as dist

    if world > 1:
        dist.barrier()
    try:
        os.unlink(shm_buffer_path(rank))
        return True
    except FileNotFoundError:
        return False
