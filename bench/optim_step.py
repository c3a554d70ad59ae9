"""Optimizer step time on BERT-shaped parameters, side by side in one run (CPU).

    python bench/optim_step.py [--model base|mini|both] [--steps 10] [--threads 2]

Every optimizer steps its own state over the same parameter and gradient tensors; rounds are
interleaved (one step of each optimizer per round) so machine noise hits all of them alike, and
the median of the rounds is reported (our LAMB's default step leaves its update direction in the
shared gradients, which changes their values but not the work the others do). Compared: our LAMB
(fused C kernels, also with keep_grads=True; foreach; loop), the
third-party LAMBs (timm, torch_optimizer, pytorch_lamb; skipped when not installed), torch's
AdamW (foreach and fused), the memory-traffic bound of LAMB (10 × 4 bytes per parameter at the
measured copy bandwidth), and the cost of the ZeRO-exact layout: the same fused step over one
flat partition holding ~200 tensor segments with per-tensor ratios and a collective, against
the same flat tensor stepped as a single tensor (per-partition ratios, what ZeRO users get today).
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optim  # noqa: E402
from optim._layout import FlatLayout  # noqa: E402


def bert_shapes(kind: str) -> list[torch.Size]:
    from transformers import BertConfig, BertForPreTraining

    cfg = BertConfig() if kind == "base" else BertConfig(hidden_size=256, num_hidden_layers=4,
                                                         num_attention_heads=4, intermediate_size=1024)
    with torch.device("meta"):
        model = BertForPreTraining(cfg)
    return [p.shape for p in model.parameters()]


def timm_lamb():
    """timm's Lamb module alone: importing the timm package needs torchvision, which would pull
    a CUDA torch build here, and the optimizer itself needs only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        return None
    root = Path(spec.origin).parent
    for name, path in (("timm", root), ("timm.optim", root / "optim")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules.setdefault(name, mod)
    return importlib.import_module("timm.optim.lamb").Lamb


def third_party() -> dict:
    out = {}
    try:
        out["timm.optim.Lamb"] = timm_lamb()
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"timm Lamb unavailable: {exc}", file=sys.stderr)
    for label, mod, attr in (("torch_optimizer.Lamb", "torch_optimizer", "Lamb"),
                             ("pytorch_lamb.Lamb", "pytorch_lamb", "Lamb")):
        try:
            out[label] = getattr(importlib.import_module(mod), attr)
        except Exception as exc:  # noqa: BLE001
            print(f"{label} unavailable: {exc}", file=sys.stderr)
    return {k: v for k, v in out.items() if v is not None}


def copy_bandwidth(n: int, reps: int = 5) -> float:
    """Bytes per second of a large copy, the machine's practical memory speed.

    A copy moves 12 bytes per fp32 element: the source read, the destination line read for
    ownership before it is written, and the write. The optimizers update in place (the lines they
    write were just read), so they pay no such extra read: counting 8 bytes would understate the
    bandwidth they can reach by a third."""
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 3 * 4 * n / statistics.median(times)


def zero_layout_optimizers(shapes, lr):
    """A flat 'rank 0 of 2' partition: half of all elements, cut through a tensor, as ZeRO does."""
    sizes = [s.numel() for s in shapes]
    total = sum(sizes)
    part = total // 2
    keys, starts, lengths, offset = [], [], [], 0
    for key, n in enumerate(sizes):
        lo, hi = max(offset, 0), min(offset + n, part)
        if hi > lo:
            keys.append(key)
            starts.append(lo)
            lengths.append(hi - lo)
        offset += n
    flat = torch.randn(part) * 0.02
    flat.grad = torch.randn(part) * 1e-3
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    exact = optim.Lamb([flat], lr=lr, impl="fused")
    layout = FlatLayout(keys=keys, starts=starts, lengths=lengths, process_group=None, partitioned=True)
    exact.attach_layouts({id(flat): layout}, [f"t{k}" for k in range(len(sizes))],
                         {id(flat): keys})
    naive = optim.Lamb([flat], lr=lr, impl="fused")
    return {"LAMB fused, ZeRO flat partition, exact": exact,
            "LAMB fused, ZeRO flat partition, per-partition": naive}, part


def bench(kind: str, steps: int, include_loop: bool) -> dict:
    shapes = bert_shapes(kind)
    n = sum(s.numel() for s in shapes)
    torch.manual_seed(0)
    params = [torch.randn(s) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    lr = 1e-6  # keeps the shared weights sane over many steps of many optimizers
    opts = {
        "LAMB fused (ours)": optim.Lamb(params, lr=lr, impl="fused"),
        "LAMB fused, keep_grads=True (ours)": optim.Lamb(params, lr=lr, impl="fused", keep_grads=True),
        "LAMB foreach (ours)": optim.Lamb(params, lr=lr, impl="foreach"),
        "AdamW fused (torch)": torch.optim.AdamW(params, lr=lr, fused=True),
        "AdamW foreach (torch)": torch.optim.AdamW(params, lr=lr, foreach=True),
    }
    if include_loop:
        opts["LAMB loop (ours)"] = optim.Lamb(params, lr=lr, impl="loop")
    third = third_party()
    for label, cls in third.items():
        opts[label] = cls(params, lr=lr)
    zero_opts, part = zero_layout_optimizers(shapes, lr)
    opts.update(zero_opts)

    times: dict[str, list[float]] = {k: [] for k in opts}
    for opt in opts.values():  # warm-up: state allocation, kernel build
        opt.step()
    for _ in range(steps):
        for label, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    bw = copy_bandwidth(min(n, 50_000_000))
    med["LAMB memory bound (10x4 B/param)"] = 10 * 4 * n / bw * 1e3
    med["AdamW memory bound (7x4 B/param)"] = 7 * 4 * n / bw * 1e3
    return {"model": kind, "params": n, "zero_partition_params": part, "copy_GBps": bw / 1e9,
            "median_ms": med, "third_party": sorted(third)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["base", "mini", "both"], default="both")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-loop", action="store_true", help="skip the slow per-tensor reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for kind in (["base", "mini"] if args.model == "both" else [args.model]):
        r = bench(kind, args.steps, include_loop=not args.no_loop)
        results.append(r)
        med = r["median_ms"]
        print(f"\nBERT-{kind} shapes: {r['params'] / 1e6:.1f}M params, {args.threads} threads, "
              f"copy bandwidth {r['copy_GBps']:.1f} GB/s, median of {args.steps} interleaved steps")
        print(f"{'optimizer':52s} {'ms/step':>9s} {'vs AdamW fused':>15s}")
        for label, ms in sorted(med.items(), key=lambda kv: kv[1]):
            print(f"{label:52s} {ms:9.1f} {ms / med['AdamW fused (torch)']:14.2f}x")
        third = [med[k] for k in r["third_party"]]
        summary = {
            "lamb_fused_vs_adamw_fused": med["LAMB fused (ours)"] / med["AdamW fused (torch)"],
            "fastest_third_party_vs_lamb_fused": (min(third) / med["LAMB fused (ours)"]) if third else None,
            "zero_exact_overhead": med["LAMB fused, ZeRO flat partition, exact"]
            / med["LAMB fused, ZeRO flat partition, per-partition"] - 1,
        }
        r["summary"] = summary
        print("summary: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if v is not None))
    print(json.dumps({"bench": "optim_step", "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
