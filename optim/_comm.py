"""Collectives on the device their backend needs.

NCCL (and the other accelerator backends) refuse CPU tensors, while some of the optimizer's
tensors live on the CPU: under ZeRO-Offload the C kernels step CPU partitions and return their
partial sums there. A CPU tensor bound for such a backend goes to the accelerator and back;
gloo and MPI take CPU tensors as they are.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

CPU_BACKENDS = ("gloo", "mpi")


def collective_device(backend: str, tensor_device: torch.device,
                      accelerator_device: Optional[str] = None) -> torch.device:
    """Where a tensor on ``tensor_device`` must be for a collective of ``backend`` (a name as
    ``torch.distributed.get_backend`` gives it: "nccl", "gloo", "cpu:gloo,cuda:nccl", ...)."""
    if tensor_device.type != "cpu" or any(b in str(backend).lower() for b in CPU_BACKENDS):
        return tensor_device
    if accelerator_device is None:
        from deepspeed.accelerator import get_accelerator

        accelerator_device = get_accelerator().current_device_name()
    return torch.device(accelerator_device)


def all_reduce_sum(tensor: torch.Tensor, group=None, *, backend: Optional[str] = None,
                   accelerator_device: Optional[str] = None,
                   all_reduce: Optional[Callable] = None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` in place, on the device the group's backend needs."""
    import torch.distributed as dist

    if backend is None:
        backend = dist.get_backend(group)
    target = collective_device(backend, tensor.device, accelerator_device)
    work = tensor if target == tensor.device else tensor.to(target)
    (all_reduce or dist.all_reduce)(work, op=dist.ReduceOp.SUM, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor
