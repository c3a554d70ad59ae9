"""Cost of the gradient-noise-scale measurement (pretrain/gns.py), side by side in one run.

    python bench/gns_overhead.py [--model mini] [--micro 8] [--accum 4] [--steps 20] [--every 10]

One DeepSpeed engine (one process, fp32, LAMB), batches in memory; steps alternate between
measured and plain (A B A B, so machine load hits both alike). The measurement's cost per
measured step, over ``every`` steps of the plain step time, is the overhead at that cadence
(target <= 3% at the default, 10). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optim  # noqa: E402
from pretrain.gns import NoiseScale  # noqa: E402
from pretrain.model import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="pairs of (measured, plain) steps")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29583")
    from pretrain.distributed import init_distributed

    init_distributed()
    vocab = 30522
    model = build_model(args.model, vocab, seed=0)
    glob = args.micro * args.accum
    cfg = {"train_batch_size": glob, "train_micro_batch_size_per_gpu": args.micro,
           "gradient_accumulation_steps": args.accum, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-4, "variant": "nvidia"}}}
    engine, _, _, _ = optim.initialize(model=model, config=cfg)
    ns = NoiseScale(engine, every=1, ema=0.95, micro=args.micro, glob=glob, accum=args.accum)
    g = torch.Generator().manual_seed(0)
    P = 20
    batches = []
    for _ in range(args.accum):
        ids = torch.randint(1000, vocab, (args.micro, args.seq), generator=g)
        batches.append({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
                        "masked_lm_positions": torch.randint(0, args.seq, (args.micro, P), generator=g),
                        "masked_lm_labels": torch.randint(1000, vocab, (args.micro, P), generator=g),
                        "next_sentence_label": torch.randint(0, 2, (args.micro,), generator=g)})

    def step() -> float:
        t = time.perf_counter()
        ns.begin_step(1)  # measured unless ns.enabled is off
        for i, b in enumerate(batches):
            out = engine(**b)
            engine.backward(out.loss)
            ns.end_micro(boundary=i == len(batches) - 1)
            engine.step()
        ns.end_step(True)
        return time.perf_counter() - t

    plain, measured = [], []
    for k in range(args.steps + 2):
        a = step()
        ns.enabled = False  # a plain step: no hooks attached
        b = step()
        ns.enabled = True
        if k >= 2:
            measured.append(a)
            plain.append(b)
    t_plain, t_meas = statistics.median(plain), statistics.median(measured)
    extra = t_meas - t_plain
    overhead = extra / (args.every * t_plain)
    res = {"bench": "gns_overhead", "model": args.model, "micro": args.micro, "accum": args.accum,
           "threads": args.threads, "plain_step_ms": t_plain * 1e3, "measured_step_ms": t_meas * 1e3,
           "extra_ms_per_measurement": extra * 1e3, "every": args.every, "overhead_at_every": overhead,
           "b_simple": ns.record().get("gns_b_simple")}
    print(f"\n{args.model}, micro {args.micro} x {args.accum} accumulation, seq {args.seq}, {args.threads} threads, "
          f"median of {len(plain)} interleaved pairs")
    print(f"{'measure':44s} {'value':>10s}")
    print(f"{'plain step (ms)':44s} {t_plain * 1e3:10.1f}")
    print(f"{'measured step (ms)':44s} {t_meas * 1e3:10.1f}")
    print(f"{'extra per measurement (ms)':44s} {extra * 1e3:10.2f}")
    print(f"{f'overhead at gns_every={args.every} (target <= 3%)':44s} {100 * overhead:9.2f}%")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
