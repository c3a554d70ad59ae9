"""Stages e and f: ``bench/engine_step.py`` in a process of its own (it starts a process group),
its ``ENGINE_STEP`` / ``ENGINE_COMPILE`` line read back.

e. The bare loop and DeepSpeed engines at ZeRO 1 and 2, batches in memory, interleaved rounds;
   a profile of one step of the bare loop and of the ZeRO-2 engine (traces in OUT/engine_step_e).
f. The ZeRO-2 engine compiled as ``pretrain.compile`` "default" does against the eager one
   (inductor's first compilation of BERT-Large takes a minute or more).
"""
from __future__ import annotations

import json
import os
import sys

from bench.gpucheck.common import REPO
from bench.gpucheck.procs import run_captured


def stage_e(args, report, state: dict, compiled: bool = False) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "engine_step.py"), "--data", str(args.data), "--model", args.model,
           "--micro", str(args.micro), "--accum", str(args.accum),
           "--out", str(args.out / f"engine_step_{'f' if compiled else 'e'}")]
    cmd += ["--modes", "zero2", "--no-profile", "--compile", "aot_eager" if args.device == "cpu" else "default"] \
        if compiled else ["--modes", "bare,zero1,zero2"]
    if args.device == "cpu":
        cmd += ["--rounds", "2"]
    env = dict(os.environ, MASTER_PORT=str(args.port + 11), PYTHONUNBUFFERED="1")
    out, rc = run_captured(cmd, env, timeout=args.stage_timeout + 90)
    key = "ENGINE_COMPILE" if compiled else "ENGINE_STEP"
    line = next((x[len(key) + 1:] for x in out.splitlines() if x.startswith(key + " ")), None)
    if line is None:
        report(f"{'f.compile' if compiled else 'e.engine'}", False, {"rc": rc, "log_tail": out[-2500:]},
               f"failed (rc {rc}): {out.strip().splitlines()[-1] if out.strip() else ''}")
        return
    rec = json.loads(line)
    if compiled:
        rate = rec["samples_per_s"]
        report("f.compile", None, rec, f"ZeRO-2 engine compiled ({rec['backend']}): {rate['zero2c']:.1f} against "
               f"{rate['zero2']:.1f} samples/s eager = {rec['speedup']:.2f}x; first step {rec['first_step_s']:.1f} s")
        return
    state["engine_samples_per_s"] = rec["samples_per_s"]
    report("e.engine", None, rec, ", ".join(f"{m} {v:.1f}" for m, v in rec["samples_per_s"].items()) + " samples/s; "
           + "; ".join(f"{m} step {p['wall_ms']:.0f} ms" + (f" (device busy {p['device_busy_ms']:.0f} ms)"
                                                           if p.get("device_busy_ms") else "")
                       for m, p in rec["profiles"].items()))


def stage_f(args, report, state: dict) -> None:
    stage_e(args, report, state, compiled=True)
