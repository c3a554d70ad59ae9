"""One way to start the process group, for pretraining and fine-tuning alike.

Under a launcher (``deepspeed``, ``torchrun``: RANK and friends in the environment) or ``mpiexec``
(ranks found through mpi4py by DeepSpeed) the launcher decides. Ranks started by Slurm's ``srun``
(one task per GPU) get RANK, WORLD_SIZE, LOCAL_RANK and the master's address from the step's
SLURM_* variables, and a port derived from the job id (two jobs on one node differ) unless
MASTER_PORT is set. A plain ``python`` run is a world of one; it binds a free port unless
MASTER_PORT says otherwise, so several single-process runs can share a machine.

On CPUs DeepSpeed's shared-memory all-reduce maps one file per rank under /dev/shm (69 MB in
DeepSpeed 0.19) and never unlinks it, so every CPU run used to leave its ranks' files behind
until the disk filled. ``init_distributed`` unlinks them as soon as every rank has mapped every
other's: the mappings live on until the processes exit, however they exit (SIGKILL included).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "PMIX_RANK")
# Ports derived from a Slurm job id: below Linux's ephemeral range (32768-60999), above the
# well-known and registered services most clusters run.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 12000, 20000


def _launcher_vars() -> bool:
    return "RANK" in os.environ or any(k in os.environ for k in MPI_VARS)


def launched() -> bool:
    """Whether a launcher decided the ranks (deepspeed, torchrun, mpiexec or srun)."""
    return _launcher_vars() or bool(slurm_env())


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list as names, in order: ``node[01-03,07],gpu1`` -> node01, node02,
    node03, node07, gpu1 (zero padding kept; several bracket groups in one name multiply out, as
    ``scontrol show hostnames`` does)."""
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):  # split on commas outside brackets
        hosts.extend(_expand_name(name))
    return hosts


def _expand_name(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[:m.start()], _expand_name(name[m.end():])
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"bad Slurm host list {name!r}: range {part!r}")
        width = len(lo)  # node[08-10] -> node08, node09, node10
        for i in range(int(lo), int(hi or lo) + 1):
            out.extend(f"{head}{i:0{width}d}{t}" for t in tail)
    return out


def slurm_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for a task of an ``srun`` step;
    {} outside one. A batch script also has SLURM_PROCID (0) and SLURM_NTASKS (the allocation's),
    but no step id: a plain ``python`` there is a world of one, not rank 0 of ranks never started."""
    if "SLURM_PROCID" not in environ or "SLURM_STEP_ID" not in environ:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    port = environ.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN)
    return {"RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "1"),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
            "MASTER_PORT": port}


def launcher_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's rank as its launcher assigned it, readable before the process group exists
    (0 in a plain run): for messages that would otherwise be printed once by every rank."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if environ.get(key, "").isdigit():
            return int(environ[key])
    return int(slurm_env(environ).get("RANK", 0))


def init_distributed() -> tuple[int, int]:
    """(rank, world size), with DeepSpeed's process group started."""
    import deepspeed
    import deepspeed.comm as dist

    if not _launcher_vars():  # a launcher started under srun (one task per node) sets its own
        os.environ.update(slurm_env())
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
