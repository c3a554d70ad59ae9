"""Stage o's worker: 3 steps of a small model under ZeRO-2 with the optimizer offloaded to the
CPU, our LAMB stepping the CPU partitions while the gradients travel on the device's group
(NCCL on a GPU): the CPU kernels' per-tensor sums must reach that collective.

    python -m bench.gpucheck.offload_worker bf16|fp32      (from the repository root)

Prints ``OFFLOAD_OK [losses] BACKEND`` on success (the line stage o looks for).
"""
from __future__ import annotations

import sys


def main(precision: str) -> int:
    import torch

    import optim
    from pretrain.distributed import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**9,
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-2, "variant": "nvidia"}},
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
           "zero_force_ds_cpu_optimizer": False}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, *_ = optim.initialize(model=model, config=cfg)
    x = torch.randn(8, 64, device=engine.device, dtype=next(engine.module.parameters()).dtype)
    losses = []
    for _ in range(3):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    print("OFFLOAD_OK", losses, torch.distributed.get_backend())
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("bf16", "fp32"):
        print("usage: python -m bench.gpucheck.offload_worker bf16|fp32", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
