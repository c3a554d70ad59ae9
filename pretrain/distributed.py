"""One way to start the process group, for pretraining and fine-tuning alike.

Under a launcher (``deepspeed``, ``torchrun``: RANK and friends in the environment) or ``mpiexec``
(ranks found through mpi4py by DeepSpeed) the launcher decides. A plain ``python`` run is a world
of one; it binds a free port unless MASTER_PORT says otherwise, so several single-process runs
can share a machine.
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
    return dist.get_rank(), dist.get_world_size()
