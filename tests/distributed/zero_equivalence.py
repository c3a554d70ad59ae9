"""Worker for tests/test_optim_zero.py: train a small BERT for a few steps under DeepSpeed on
every rank, in several modes one after another, and save rank 0's final weights per mode.

Launched as ``deepspeed --num_gpus 2 zero_equivalence.py --out DIR --runs JSON`` (or
``mpiexec -n 2 python ...``), JSON a list of ``[tag, mode, optimizer block]``. Modes: ``zero{0,1,2}`` fp32, ``bf16_zero{0,1,2}``,
``naive_zero2``/``naive_bf16_zero2`` (trust ratios per flat partition, as every LAMB used with
ZeRO computes them without a layout: the regression this project fixes), ``zero3`` (refused),
``resume_zero2`` (3 steps, DeepSpeed checkpoint, a fresh engine loads it, 2 more steps),
``accum_zero2``/``accum_bf16_zero{1,2}`` (two micro-batches per step: the optimizer uses the
gradient buffers as scratch, which must not leak into the next accumulation; bf16 ZeRO-1 keeps one
persistent fp32 gradient buffer), ``accum_offload_zero2`` (optimizer offloaded to the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import optim  # noqa: E402
from optim._layout import whole_tensor_layout  # noqa: E402
from pretrain.distributed import init_distributed  # noqa: E402
from tests.distributed.tiny_bert import GLOBAL_BATCH, STEPS, batches, make_model  # noqa: E402


def ds_config(mode: str, world: int, opt: dict) -> dict:
    stage = int(mode[-1])  # "zero2", "bf16_zero1", "naive_zero2", ...
    accum = accumulation(mode)
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // accum,
        "gradient_accumulation_steps": accum,
        "optimizer": opt,
        # Buckets just above the model (79,776 parameters): one reduction per step, as BERT-Large
        # under the 5e8-element default, without allocating that default (which deterministic
        # mode fills with NaN: ~20 s per run on 2 CPU cores).
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 2**17, "allgather_bucket_size": 2**17},
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed's default (1.0) would clip; the reference does not
        "wall_clock_breakdown": False,
    }
    if "bf16" in mode:
        cfg["bf16"] = {"enabled": True}
    if "offload" in mode:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def accumulation(mode: str) -> int:
    return 2 if mode.startswith("accum") else 1


def run(tag: str, mode: str, opt: dict, out: Path) -> None:
    import deepspeed.comm as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    model = make_model()
    cfg = ds_config(mode, world, opt)
    if mode.startswith("naive"):
        import deepspeed

        params = dict(opt["params"])
        if params.get("variant") == "nvidia":  # clipping left to DeepSpeed, as users do today
            params["grad_pre_normalization"] = False
            cfg["gradient_clipping"] = params.get("max_grad_norm", 1.0)
        basic = optim.create(opt["type"], optim.param_groups(model, params.get("weight_decay", 0.0)), **params)
        # Today's behaviour: any tensor handed to the optimizer counts as one layer.
        basic._layout_of = lambda p: whole_tensor_layout(0, p.numel())
        del cfg["optimizer"]
        cfg["zero_allow_untested_optimizer"] = True
        engine, *_ = deepspeed.initialize(model=model, config=cfg, optimizer=basic)
    else:
        try:
            engine, *_ = optim.initialize(model=model, config=cfg)
        except (ValueError, RuntimeError) as exc:
            if rank == 0:
                (out / f"{tag}.error.txt").write_text(str(exc))
            return
    losses = []
    micro = GLOBAL_BATCH // world // accumulation(mode)
    for step, batch in enumerate(batches()):
        if mode.startswith("resume") and step == STEPS // 2 + 1:
            ckpt = out / f"{tag}.ckpt"
            engine.save_checkpoint(str(ckpt), tag="mid")
            engine, *_ = optim.initialize(model=make_model(), config=cfg)  # fresh weights, fresh state
            engine.load_checkpoint(str(ckpt), tag="mid")
        for a in range(accumulation(mode)):
            lo = (rank * accumulation(mode) + a) * micro
            part = {k: v[lo:lo + micro].to(engine.device) for k, v in batch.items()}
            loss = engine(**part).loss
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    ratios = engine.basic_optimizer.trust_ratios() if hasattr(engine.basic_optimizer, "trust_ratios") else {}
    keep_grads = getattr(engine.basic_optimizer, "keep_grads", None)
    if rank == 0:
        state = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}
        torch.save({"params": state, "losses": losses, "ratios": ratios, "keep_grads": keep_grads}, out / f"{tag}.pt")
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", required=True, help="JSON list of [tag, mode, optimizer block]")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    init_distributed()
    torch.use_deterministic_algorithms(True)
    for tag, mode, opt in json.loads(args.runs):
        run(tag, mode, opt, args.out)
    os.environ.pop("LOCAL_RANK", None)


if __name__ == "__main__":
    main()
