"""Stages a, b and v: the optimizers alone, on random tensors.

a. LAMB (paper, nvidia, deepspeed) and LARS: ``impl="loop"`` against ``"foreach"`` against the
   default path, fp32 and bf16, and whether the default path compiles again as lr changes.
b. Step time on BERT shapes: AdamW against our LAMB on each path and LAMB's memory-traffic bound.
v. The default GPU LAMB step's Triton kernels in five layouts, and the loader's samples/s by
   DataLoader workers.
"""
from __future__ import annotations

import statistics
import time

from bench.gpucheck.common import accelerator, bert_problem, decay_groups


def compile_count() -> int:
    """Kernels or graphs compiled so far by the default GPU path (Triton kernels of optim, or
    torch.compile graphs)."""
    n = 0
    try:
        from optim import _triton

        n += _triton.compiled_variants()
    except Exception:  # noqa: BLE001 - the module may not exist in this version
        pass
    try:
        from torch._dynamo.utils import counters

        n += int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        pass
    return n


def stage_a(args, report, state: dict) -> None:
    import torch

    import optim

    dev = torch.device(args.device)
    shapes = [(64, 33), (33,), (1000,), (7, 5, 3), (1,), (4099,), (257, 129), (128,)]
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 0.01 for s in shapes] for _ in range(20)]
    makers = {
        "lamb-paper": lambda g, impl: optim.Lamb(g, lr=1e-2, variant="paper", impl=impl),
        "lamb-nvidia": lambda g, impl: optim.Lamb(g, lr=1e-2, variant="nvidia", impl=impl),
        "lamb-deepspeed": lambda g, impl: optim.Lamb(g, lr=1e-2, variant="deepspeed", impl=impl),
        "lars": lambda g, impl: optim.Lars(g, lr=1e-1, weight_decay=0.01, momentum=0.9, impl=impl),
    }

    def run(make, impl, dtype, counts=None):
        ws = [w.to(dev, dtype).clone().requires_grad_(True) for w in w0]
        opt = make(decay_groups(ws), impl)
        base = [g["lr"] for g in opt.param_groups]
        for step, gs in enumerate(grads):
            for w, g in zip(ws, gs):
                w.grad = g.to(dev, dtype).clone()
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * (step + 1) / len(grads)  # a warmup: lr changes every step
            opt.step()
            if counts is not None and step in (1, len(grads) - 1):
                counts.append(compile_count())
        return [w.detach().float().cpu() for w in ws]

    def rel(a, b):
        return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b))

    rows = {}
    for name, make in makers.items():
        ref = run(make, "loop", torch.float32)
        fe = run(make, "foreach", torch.float32)
        counts: list[int] = []
        default = run(make, None, torch.float32, counts)
        bf16 = run(make, None, torch.bfloat16)
        rows[name] = {"foreach_rel": rel(fe, ref), "default_rel": rel(default, ref), "bf16_rel": rel(bf16, ref),
                      "compiled_after_step2": counts[0], "compiled_after_step20": counts[1]}
    ok = all(r["foreach_rel"] <= 1e-6 and r["default_rel"] <= 1e-6 and r["bf16_rel"] <= 3e-2
             and r["compiled_after_step20"] == r["compiled_after_step2"] for r in rows.values())
    summary = "; ".join(f"{n}: foreach {r['foreach_rel']:.1e}, default {r['default_rel']:.1e}, bf16 {r['bf16_rel']:.1e}, "
                        f"compiled {r['compiled_after_step2']}->{r['compiled_after_step20']}" for n, r in rows.items())
    report("a.optim", ok, {"device": str(dev), "results": rows}, summary)


def stage_b(args, report, state: dict) -> None:
    import torch

    import optim

    acc = accelerator()
    dev, params, grads = bert_problem(args.device, args.model)
    n = sum(p.numel() for p in params)

    opts = {}
    if dev.type != "cpu":
        opts["AdamW fused"] = torch.optim.AdamW(decay_groups(params), lr=1e-4, fused=True)
    else:
        opts["AdamW foreach"] = torch.optim.AdamW(decay_groups(params), lr=1e-4, foreach=True)
    opts["LAMB default"] = optim.Lamb(decay_groups(params), lr=1e-4, variant="nvidia")
    opts["LAMB foreach"] = optim.Lamb(decay_groups(params), lr=1e-4, variant="nvidia", impl="foreach")
    opts["LAMB loop"] = optim.Lamb(decay_groups(params), lr=1e-4, variant="nvidia", impl="loop")

    # Copy bandwidth: read + write of a large buffer (GPUs write without reading the line first).
    src = torch.empty(max(n, 1 << 20), device=dev)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(6):
        acc.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        acc.synchronize()
        copies.append(time.perf_counter() - t)
    bandwidth = 2 * 4 * src.numel() / statistics.median(copies[1:])
    del src, dst
    bound_ms = 40 * n / bandwidth * 1e3  # LAMB: w, g, m, v read; m, v, u written; w, u read, w written

    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds + 1):  # round 0 includes first-call work (compilation)
        for name, opt in opts.items():
            for p, g in zip(params, grads):
                p.grad = g.clone() if name.startswith("LAMB") else g  # LAMB may use grads as scratch
            acc.synchronize()
            t = time.perf_counter()
            opt.step()
            acc.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
    first_ms = {k: v[0] * 1e3 for k, v in times.items()}
    adamw = med.get("AdamW fused", med.get("AdamW foreach"))
    ratio = med["LAMB default"] / adamw
    ok = ratio <= 1.6 if dev.type != "cpu" else None
    report("b.step", ok, {"model": args.model, "params": n, "copy_GBps": bandwidth / 1e9, "lamb_bound_ms": bound_ms,
                          "median_ms": med, "first_step_ms": first_ms, "lamb_default_over_adamw": ratio},
           f"{n / 1e6:.0f}M params: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
           + f", LAMB bound {bound_ms:.2f} ms ({bandwidth / 1e9:.0f} GB/s); default LAMB / AdamW = {ratio:.2f}x")
    for opt in opts.values():
        opt.state.clear()
    del opts, params, grads
    if dev.type != "cpu":
        acc.empty_cache()


def stage_v(args, report, state: dict) -> None:
    import optim
    from optim import _triton

    acc = accelerator()
    dev, params, grads = bert_problem(args.device, args.model)
    groups = decay_groups(params)
    defaults = (_triton.SPLIT_EVEN, _triton.HINTS, _triton.NUM_WARPS)
    variants = {}
    configs = [("masked", False, False, 8), ("even", True, False, 8), ("even+hints", True, True, 8),
               ("even+hints w4", True, True, 4), ("even+hints w16", True, True, 16)]
    for variant in ("nvidia", "paper"):
        for name, split, hints, warps in configs if variant == "nvidia" else configs[2:3]:
            _triton.SPLIT_EVEN, _triton.HINTS, _triton.NUM_WARPS = split, hints, warps
            opt = optim.Lamb(groups, lr=1e-4, variant=variant, impl="fused")
            times = []
            for _ in range(8):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                acc.synchronize()
                t = time.perf_counter()
                opt.step()
                acc.synchronize()
                times.append(time.perf_counter() - t)
            variants[f"{variant} {name}"] = statistics.median(times[2:]) * 1e3
            opt.state.clear()
    _triton.SPLIT_EVEN, _triton.HINTS, _triton.NUM_WARPS = defaults
    report("v.kernels", None, {"median_ms": variants},
           ", ".join(f"{k} {v:.2f} ms" for k, v in variants.items()))
    del params, grads, groups

    from data_prep import PretrainingDataset
    from pretrain.data import TrainStream

    loader = {}
    ds = PretrainingDataset(args.data / "seq128", max_predictions=20, shards=[0, 1, 2])
    for workers in (1, 2, 4, 8):
        stream = TrainStream(ds, args.micro, 1, 0, 0, workers, pin_memory=dev.type != "cpu")
        stream.next()
        t = time.perf_counter()
        for _ in range(12):
            stream.next()
        loader[workers] = 12 * args.micro / (time.perf_counter() - t)
        stream._iter = None
    report("v.loader", None, {"samples_per_s_by_workers": loader},
           ", ".join(f"{k} workers {v:.0f} samples/s" for k, v in loader.items()))
