"""Stage d: the model, batch and precision of stage c in a bare PyTorch loop (batches in memory,
autocast, our LAMB); the pipeline's samples/s against it (target >= 0.9x on a GPU)."""
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
    bare = args.micro * args.accum / statistics.median(times)
    state["bare_samples_per_s"] = bare
    pipe = state.get("pipeline_samples_per_s")
    ratio = pipe / bare if pipe else None
    n = sum(p.numel() for p in model.parameters())
    mfu = common.mfu(n, bare * 128, state.get("device_name", ""))  # 128 tokens per sample
    report("d.bare", (ratio >= 0.9) if ratio is not None and dev.type != "cpu" else None,
           {"bare_samples_per_s": bare, "pipeline_samples_per_s": pipe, "pipeline_over_bare": ratio, "bare_mfu": mfu},
           f"bare loop {bare:.1f} samples/s (MFU {mfu if mfu else float('nan'):.3f}); pipeline "
           f"{pipe if pipe else float('nan'):.1f} samples/s = {ratio if ratio else float('nan'):.2f}x")
