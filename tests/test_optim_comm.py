"""Collectives get tensors on the device their backend needs (ZeRO-Offload with NCCL: the CPU
kernels' partial sums are CPU tensors, which NCCL refuses)."""
from __future__ import annotations

import pytest
import torch

from optim import _comm

CPU, GPU = torch.device("cpu"), torch.device("cuda:0")  # a device object needs no GPU


@pytest.mark.parametrize("backend,device,want", [
    ("nccl", CPU, GPU), ("NCCL", CPU, GPU), ("gloo", CPU, CPU), ("mpi", CPU, CPU),
    ("cpu:gloo,cuda:nccl", CPU, CPU), ("nccl", GPU, GPU), ("gloo", GPU, GPU),
])
def test_collective_device(backend, device, want):
    assert _comm.collective_device(backend, device, accelerator_device="cuda:0") == want


class Delivered(Exception):
    pass


def nccl_like(tensor, op=None, group=None):
    """Stands in for NCCL: CPU tensors are refused, as the real backend does."""
    if tensor.device.type == "cpu":
        raise RuntimeError("No backend type associated with device type cpu")
    raise Delivered(tensor.device)


def test_offloaded_sums_reach_an_accelerator_backend_on_the_accelerator():
    sums = torch.ones(2, 5, dtype=torch.float64)  # what the CPU kernels return under ZeRO-Offload
    with pytest.raises(Delivered) as got:
        _comm.all_reduce_sum(sums, None, backend="nccl", accelerator_device="meta", all_reduce=nccl_like)
    assert got.value.args[0].type == "meta"


def test_cpu_backends_reduce_in_place():
    sums = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    seen = []

    def gloo_like(tensor, op=None, group=None):
        seen.append(tensor)
        tensor.mul_(2)  # as a sum over two ranks holding the same values

    out = _comm.all_reduce_sum(sums, None, backend="gloo", all_reduce=gloo_like)
    assert seen[0] is sums and out is sums
    assert torch.equal(sums, 2 * torch.arange(6, dtype=torch.float64).reshape(2, 3))
