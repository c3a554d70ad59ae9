"""Stages c and g: ``pretrain/run.py`` through the DeepSpeed launcher on one device, read back
from its metrics.jsonl.

c. BERT-Large, seq 128, ZeRO-2, LAMB ``nvidia``: precision "auto" (bf16 on a GPU) uninterrupted;
   the same sent a real SIGTERM half way, then ``--resume`` (its losses against the uninterrupted
   run's); on a GPU fp16 with dynamic loss scaling too.
g. Stage c's "auto" run with ``pretrain.compile`` "default" (inductor; "aot_eager" on the CPU).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

from bench.gpucheck import common
from bench.gpucheck.common import REPO
from bench.gpucheck.procs import run_group, tail


def run_config(args, out: Path, precision: str, compile: str = "off") -> Path:
    """The shipped lamb_64k.json cut to this check (batch, steps, data, no evaluation or
    checkpoints), written to out/config_PRECISION[_compiled].json."""
    cfg = json.loads((REPO / "ds_configs" / "lamb_64k.json").read_text())
    cfg.pop("_comment", None)
    cfg.pop("fp16", None)
    bf16 = cfg.pop("bf16", None) or {}  # the shipped block's other keys (check_grad_overflow) kept
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "auto":  # as the shipped GPU configs: bf16 where the GPU has it
        cfg["bf16"] = {**bf16, "enabled": "auto"}
        cfg["fp16"] = {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}
    cfg["train_batch_size"] = args.micro * args.accum
    cfg["train_micro_batch_size_per_gpu"] = args.micro
    cfg["zero_optimization"] = {"stage": 2}
    cfg["optimizer"]["params"]["lr"] = args.lr
    steps = args.fp16_steps if precision == "fp16" else args.steps
    cfg["pretrain"].update(model=args.model, max_steps=steps, data=str(args.data / "seq128"), log_every=1,
                           eval_every=0, eval_samples=0, validation_shards=1, checkpoint_every=0,
                           keep_checkpoints=1, num_workers=2, tensorboard=False, compile=compile)
    path = out / f"config_{precision}{'' if compile == 'off' else '_compiled'}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def launch(args, cfg: Path, run_dir: Path, log: Path, extra=(), stop_at_step: int | None = None,
           timeout: float = 300.0) -> tuple[int, float]:
    """Start run.py through the DeepSpeed launcher; with ``stop_at_step`` send SIGTERM (to the
    launcher's whole process group, or the ranks with --signal-to ranks) once metrics.jsonl shows
    that step. Returns (rc, seconds)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
           "--master_port", str(args.port), str(REPO / "pretrain" / "run.py"), "--config", str(cfg),
           "--output", str(run_dir), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "2")
    stop_when = None if stop_at_step is None else (lambda: max(losses(run_dir), default=0) >= stop_at_step)
    return run_group(cmd, log, env, timeout, stop_when, signal_ranks=args.signal_to == "ranks")


def records(run_dir: Path) -> list[dict]:
    from pretrain.metrics import read_records

    return read_records(run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def throughput(run_dir: Path, skip: int) -> dict:
    """Medians of the rates past step ``skip`` (compilation, warm-up), last values of the rest."""
    recs = [r for r in records(run_dir) if "loss" in r and r["step"] > skip]
    if not recs:
        return {}
    rates = ("samples_per_s", "tokens_per_s", "mfu", "hfu", "fill", "data_wait")
    out = {}
    for k in rates + ("peak_mem_gib", "loss_scale", "skipped_steps"):
        vals = [r[k] for r in recs if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals) if k in rates else vals[-1]
    return out


def resolved_precision(run_dir: Path) -> str | None:
    """The precision run.py chose ("auto" resolved), from its config.effective.json."""
    from optim import precision as precision_mod

    path = run_dir / "config.effective.json"
    if not path.is_file():
        return None
    return precision_mod.precision_of(json.loads(path.read_text()))


def params_from_log(log: Path) -> int | None:
    """The parameter count run.py logs ("(335.1M params)")."""
    m = re.search(r"\(([\d.]+)M params\)", log.read_text() if log.is_file() else "")
    return int(float(m.group(1)) * 1e6) if m else None


def stage_c(args, report, state: dict) -> None:
    from optim import precision as precision_mod

    out = args.out / "runs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n_params = None
    # "auto": bf16 on an H100; on a CPU without bf16 instructions fp32 (bf16 would run at a tenth
    # of the speed there).
    precisions = ["auto", "fp16"] if args.device != "cpu" else ["auto"]
    for prec in precisions:
        cfg = run_config(args, out, prec)
        run_dir = out / f"{prec}_full"
        rc, secs = launch(args, cfg, run_dir, out / f"{prec}_full.log", timeout=args.run_timeout)
        ls = losses(run_dir)
        steps = args.fp16_steps if prec == "fp16" else args.steps
        tp = throughput(run_dir, skip=max(2, steps // 4))
        resolved = resolved_precision(run_dir)
        if n_params is None:
            n_params = params_from_log(out / f"{prec}_full.log")
        mfu = tp.get("mfu")  # run.py's, the field's count (pretrain/flops.py); the old one beside it
        old = common.mfu_old_count(n_params, tp["samples_per_s"] * 128, state.get("device_name", "")) \
            if n_params and tp.get("samples_per_s") else None
        first, last = (ls[min(ls)], ls[max(ls)]) if ls else (math.nan, math.nan)
        drop = 0.5 if args.device != "cpu" else 0.0  # the smoke run is 10 steps of a tiny model
        falls = bool(ls) and statistics.mean([ls[s] for s in sorted(ls)[-3:]]) < statistics.mean([ls[s] for s in sorted(ls)[:3]]) - drop
        ok = rc == 0 and len(ls) == steps and falls
        if prec == "auto":
            ok = ok and resolved == ("bf16" if args.device != "cpu" else precision_mod.auto_choice())
        state.setdefault("pipeline_samples_per_s", tp.get("samples_per_s"))
        rec = {"precision": prec, "resolved": resolved, "rc": rc, "seconds": secs, "steps_logged": len(ls), "loss_first": first,
               "loss_last": last, "mfu_old_count": old, **tp}
        if not ok:
            rec["log_tail"] = tail(out / f"{prec}_full.log")
        report(f"c.{prec}", ok, rec,
               f"{prec} -> {resolved}: rc {rc}, {secs:.0f} s, loss {first:.3f} -> {last:.3f}, {tp.get('samples_per_s', 0):.1f} samples/s, "
               f"{tp.get('tokens_per_s', 0):.0f} real tok/s, MFU {mfu if mfu is not None else float('nan'):.3f} "
               f"(old count {old if old is not None else float('nan'):.3f}), fill {tp.get('fill') or float('nan'):.3f}, "
               f"peak mem {tp.get('peak_mem_gib', 'n/a')} GiB, loss scale {tp.get('loss_scale')}, "
               f"skipped {tp.get('skipped_steps')}")
        if prec != precisions[0] or rc != 0:
            continue
        # The same run, SIGTERM half way, then --resume.
        half = args.steps // 2
        run2 = out / f"{prec}_resumed"
        rc1, s1 = launch(args, cfg, run2, out / f"{prec}_stopped.log", stop_at_step=half, timeout=args.run_timeout)
        stopped = max(losses(run2), default=0)
        saved = sorted(p.name for p in (run2 / "checkpoints").glob("step*")) if (run2 / "checkpoints").is_dir() else []
        rc2, s2 = launch(args, cfg, run2, out / f"{prec}_resume.log", extra=["--resume"], timeout=args.run_timeout)
        ls2 = losses(run2)
        pre = [abs(ls2[s] - ls[s]) for s in ls2 if s <= half and s in ls]
        post = [abs(ls2[s] - ls[s]) / abs(ls[s]) for s in ls2 if s > stopped and s in ls]
        noise = max(pre, default=math.nan)
        worst = max(post, default=math.nan)
        # The runner's own exit status after a group signal is its business (deepspeed's runner
        # dies of the signal); what must hold is a checkpoint at the step reached, and a resume.
        ok = saved == [f"step{stopped:07d}"] and rc2 == 0 and len(post) == args.steps - stopped \
            and worst <= args.resume_rtol
        rec = {"rc_stopped": rc1, "rc_resumed": rc2, "signal_at_step": half, "last_step_before_stop": stopped,
               "checkpoints": saved, "max_abs_diff_before_signal": noise, "max_rel_diff_after_resume": worst,
               "steps_compared": len(post), "seconds": s1 + s2}
        if not ok:
            rec["log_tail"] = tail(out / f"{prec}_stopped.log") + "\n----\n" + tail(out / f"{prec}_resume.log")
        report("c.resume", ok, rec,
               f"SIGTERM after step {half}: stopped at {stopped} (rc {rc1}), saved {saved}; resumed rc {rc2}; "
               f"{len(post)} steps compared, max rel diff {worst:.2e} (noise before the signal {noise:.2e})")
    state["n_params"] = n_params


def stage_g(args, report, state: dict) -> None:
    """run.py as stage c's bf16 run with ``pretrain.compile`` "default" (inductor; "aot_eager" on
    the CPU): samples/s and MFU past the compilation, against the eager run and the bare loop."""
    out = args.out / "runs_compiled"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    backend = "aot_eager" if args.device == "cpu" else "default"
    cfg = run_config(args, out, "auto", compile=backend)
    run_dir = out / "auto_compiled"
    rc, secs = launch(args, cfg, run_dir, out / "auto_compiled.log", timeout=args.run_timeout + 120)
    ls = losses(run_dir)
    tp = throughput(run_dir, skip=max(2, args.steps // 4))
    first = next((r for r in records(run_dir) if r.get("step") == 1 and r.get("samples_per_s")), None)
    first_s = args.micro * args.accum / first["samples_per_s"] if first else None
    eager, bare = state.get("pipeline_samples_per_s"), state.get("bare_samples_per_s")
    rate = tp.get("samples_per_s")
    compiled = "model compiled" in tail(out / "auto_compiled.log", 100000)
    ok = rc == 0 and len(ls) == args.steps and compiled
    rec = {"backend": backend, "rc": rc, "seconds": secs, "first_step_s": first_s, "steps_logged": len(ls),
           "over_eager": rate / eager if rate and eager else None, "over_bare": rate / bare if rate and bare else None,
           **tp}
    if not ok:
        rec["log_tail"] = tail(out / "auto_compiled.log")
    report("g.compile", ok, rec,
           f"run.py compiled ({backend}): rc {rc}, {secs:.0f} s (first step {first_s or float('nan'):.1f} s), "
           f"{rate or 0:.1f} samples/s, MFU {tp.get('mfu') or float('nan'):.3f}, data wait "
           f"{tp.get('data_wait') or 0:.1%}; {rec['over_eager'] or float('nan'):.2f}x eager (stage c), "
           f"{rec['over_bare'] or float('nan'):.2f}x the bare loop (stage d)")
