"""Stage d: the model, batch and precision of stage c in a bare PyTorch loop (batches in memory,
autocast, our LAMB); the pipeline's samples/s against it (target >= 0.9x on a GPU). MFU in the
field's count (pretrain/flops.py), the old count beside it (``bare_mfu_old_count``)."""
from __future__ import annotations

import json
import statistics
import time

from bench.gpucheck import common
from bench.gpucheck.common import Bare, accelerator, batches


def stage_d(args, report, state: dict) -> None:
    import torch

    from pretrain.model import build_model

    acc = accelerator()
    dev = torch.device(args.device)
    vocab = json.loads((args.data / "seq128" / "manifest.json").read_text())["vocab"]["size"]
    data = batches(args.data, args.micro, args.accum * 2, dev)
    bare_loop = Bare(build_model(args.model, vocab, seed=0), dev, bf16=dev.type != "cpu")  # as stage c
    model = bare_loop.model
    times = []
    for step in range(args.bare_steps + 3):
        acc.synchronize()
        t = time.perf_counter()
        bare_loop.step(data[(step % 2) * args.accum:(step % 2 + 1) * args.accum])
        acc.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    bare = args.micro * args.accum / step_s
    state["bare_samples_per_s"] = bare
    pipe = state.get("pipeline_samples_per_s")
    ratio = pipe / bare if pipe else None
    # The field's count over the work of an average step (the steps alternate between two halves
    # of ``data``), and the old count (6 x all parameters x all positions) that docs/gpu quotes.
    work = {k: v / 2 for k, v in common.batches_work(data).items()}
    util = common.mfu(model.config, work, step_s, state.get("device_name", ""))
    seq = data[0]["input_ids"].shape[1]
    old = common.mfu_old_count(sum(p.numel() for p in model.parameters()), bare * seq, state.get("device_name", ""))
    report("d.bare", (ratio >= 0.9) if ratio is not None and dev.type != "cpu" else None,
           {"bare_samples_per_s": bare, "pipeline_samples_per_s": pipe, "pipeline_over_bare": ratio,
            "bare_mfu": util["mfu"], "bare_hfu": util["hfu"], "bare_mfu_old_count": old,
            "bare_tokens_per_s": work["tokens"] / step_s, "fill": work["tokens"] / work["positions"]},
           f"bare loop {bare:.1f} samples/s, {work['tokens'] / step_s:.0f} real tok/s (MFU {_pct(util['mfu'])}, "
           f"HFU {_pct(util['hfu'])}; old count {_pct(old)}); pipeline "
           f"{pipe if pipe else float('nan'):.1f} samples/s = {ratio if ratio else float('nan'):.2f}x")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
