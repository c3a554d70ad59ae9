"""Worker for tests/test_gns.py: the noise-scale estimator (pretrain/gns.py) on a problem whose
gradient noise is known in closed form, through a DeepSpeed engine (any ZeRO stage, any number
of ranks, with gradient accumulation).

Least squares, loss = ½·mean((x·w − y)²), x ~ N(0, I_d), y = x·w* + ε, ε ~ N(0, σ²). With
r = w − w* the per-sample gradient is x(x·r − ε), so G = r, |G|² = |r|² and
tr(Σ) = E|x|²(x·r)² + σ²·E|x|² − |r|² = (d+2)|r|² + σ²d − |r|² = (d+1)|r|² + σ²d.
The learning rate is 0, so the truth stays put while the estimates accumulate.

    python gns_worker.py --out RESULT.json --stage S --micro M --accum A --steps N
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import optim  # noqa: E402
from pretrain.distributed import init_distributed  # noqa: E402
from pretrain.gns import NoiseScale  # noqa: E402

D, SIGMA, R = 8, 1.0, 0.6


class LeastSquares(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((D,), R))  # w* = 0, so r = w

    def forward(self, x, y):
        return 0.5 * ((x @ self.w - y) ** 2).mean()


def truth() -> dict:
    g2 = D * R * R
    s = (D + 1) * g2 + SIGMA ** 2 * D
    return {"g2": g2, "trace": s, "b_simple": s / g2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()

    import deepspeed.comm as dist

    rank, world = init_distributed()
    glob = args.micro * args.accum * world
    cfg = {"train_batch_size": glob, "train_micro_batch_size_per_gpu": args.micro,
           "gradient_accumulation_steps": args.accum, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
           "zero_optimization": {"stage": args.stage}, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = optim.initialize(model=LeastSquares(), config=cfg)
    ns = NoiseScale(engine, every=1, ema=0.95, micro=args.micro, glob=glob, accum=args.accum,
                    all_reduce=dist.all_reduce, window=args.steps)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own samples
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for step in range(1, args.steps + 1):
        ns.begin_step(step)
        for k in range(args.accum):
            x = torch.randn(args.micro, D, generator=gen)
            y = SIGMA * torch.randn(args.micro, generator=gen)
            loss = engine(x.to(engine.device, dtype), y.to(engine.device, dtype))
            engine.backward(loss)
            ns.end_micro(boundary=k == args.accum - 1)
            engine.step()
        ns.end_step(applied=True)
    vals = torch.stack(list(ns.recent)).double()
    mean_g2, mean_s = vals[:, 0].mean().item(), vals[:, 1].mean().item()
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "truth": truth(), "world": world, "measurements": ns.measurements,
            "mean": {"g2": mean_g2, "trace": mean_s, "b_simple": mean_s / mean_g2}, "record": ns.record()}))


if __name__ == "__main__":
    main()
