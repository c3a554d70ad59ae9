"""Stage y: no host sync inside a training step, and what the noise-scale measurement costs.

y.sync   ``pretrain/run.py`` (its own ``cli()``: real data, engine and loop) under
         bench/gpucheck/sync_worker.py: from step 3 on (steps 1 and 2: one-time set-up, a
         compiled model's second shape), every host sync outside the log, evaluation,
         checkpoint and stop code is an error. On CUDA ``torch.cuda.set_sync_debug_mode("error")``;
         on the CPU (--smoke) a dispatch mode records value reads and tensors made from Python
         data instead (what tests/test_no_host_sync.py checks), so the path up to the mode switch
         runs. One log at the last step; the noise scale measured every other step, so steps with
         and without its hooks are both watched. Twice: the shipped settings (padded rows,
         pretrain.compile at its default) and packed rows (pretrain.packing "ffd", eager).
y.gns    the noise-scale measurement's cost: one run logging every step with ``gns_every`` 2,
         measuring and plain steps interleaved; the extra time of a measuring step over a plain
         one, as a share of a step at the shipped ``gns_every`` 10. Goal <= 3%.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench.gpucheck.common import REPO
from bench.gpucheck.efficiency import launch_run, phase_config
from bench.gpucheck.procs import run_group, tail

ARMED_AFTER = 2      # steps left out of the sync check: set-up, a compiled model's second shape
GNS_GOAL = 0.03      # the measurement's share of a step at gns_every 10
SHIPPED_GNS_EVERY = 10


def sync_config(args, out: Path, name: str, **pretrain) -> Path:
    """Phase 1's shipped config at the check's size, a log only at the last step, the noise scale
    every other step; on the CPU LAMB's multi-tensor path (tensors only, as on a GPU: the CPU's
    fused kernels take their scalars from host memory, where there is no device to wait for)."""
    path = phase_config(args, out, 128, micro=args.micro, steps=args.y_steps, log_every=args.y_steps, name=name,
                        gns_every=2, **pretrain)
    if args.device == "cpu":
        cfg = json.loads(path.read_text())
        cfg["optimizer"]["params"]["impl"] = "foreach"
        path.write_text(json.dumps(cfg, indent=1))
    return path


def sync_check(args, out: Path, name: str, **pretrain) -> tuple[int | str, float, dict]:
    cfg = sync_config(args, out, name, **pretrain)
    result = out / f"{name}.result.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpucheck" / "sync_worker.py"), str(result), "--after",
           str(ARMED_AFTER), "--", "--config", str(cfg), "--output", str(out / name)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "2")
    rc, secs = run_group(cmd, out / f"{name}.log", env, args.run_timeout + 120)
    return rc, secs, json.loads(result.read_text()) if result.is_file() else {}


def gns_cost(recs: list[dict], skip: int = 2) -> dict:
    """From records logged every step of a run measuring the noise scale at every other step:
    median step time with and without the measurement (steps past ``skip``), the difference, and
    its share of a plain step at gns_every 10."""
    measured, plain = [], []
    for r in recs:
        if "loss" not in r or r["step"] <= skip or not r.get("interval_s"):
            continue
        (measured if r["step"] % 2 == 0 else plain).append(r["interval_s"])
    if not measured or not plain:
        return {}
    m, p = statistics.median(measured), statistics.median(plain)
    return {"measured_step_s": m, "plain_step_s": p, "extra_s": m - p, "steps": len(measured) + len(plain),
            "share_at_10": (m - p) / (SHIPPED_GNS_EVERY * p)}


def sync_stage_row(args, report, out: Path, name: str, sets: dict) -> None:
    """One sync-check run and its row."""
    on_gpu = args.device != "cpu"
    rc, secs, res = sync_check(args, out, f"sync_{name}", **sets)
    events = res.get("events", [])
    watched = res.get("steps_watched", 0)
    ran = rc == 0 and watched == args.y_steps - ARMED_AFTER
    # On the GPU a sync is an error (the run stops at it); on the CPU the recorder lists where a
    # GPU would wait, and the run goes on.
    ok = ran and not events
    rec = {"layout": name, "rc": rc, "seconds": secs, **res, "events": events[:10]}
    if not ran or events:
        rec["log_tail"] = tail(out / f"sync_{name}.log")
    first = events[0] if events else None
    report(f"y.sync.{name}", ok, rec,
           f"{res.get('mode', 'no result')}: steps {ARMED_AFTER + 1}-{args.y_steps} watched ({watched}), "
           f"{len(events)} host sync{'s' * (len(events) != 1)}"
           + (f"; first at step {first['step']}: {first['what'][:160]} at {' <- '.join(reversed(first['where'][-3:]))}"
              if first else "") + f"; rc {rc}, {secs:.0f} s"
           + ("" if on_gpu else " (the CUDA check itself needs a GPU)"))

def stage_y(args, report, state: dict) -> None:
    from pretrain.metrics import read_records

    out = args.out / "syncs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    on_gpu = args.device != "cpu"
    # In order of value, so that a cut stage keeps the first: the shipped settings, the noise
    # scale's cost, packed rows.
    sync_stage_row(args, report, out, "padded", {})
    # The noise scale's cost: one run, every step logged, measured at every other step.
    steps = args.y_gns_steps
    cfg = phase_config(args, out, 128, micro=args.micro, steps=steps, log_every=1, name="gns", gns_every=2)
    rc, secs, _ = launch_run(args, cfg, out / "gns", out / "gns.log", steps, args.run_timeout + 120)
    cost = gns_cost(read_records(out / "gns"))
    measured = [r for r in read_records(out / "gns") if r.get("gns_b_simple") is not None]
    ok = bool(cost) and rc in (0, "done") and bool(measured)
    rec = {"rc": rc, "seconds": secs, "gns_every_measured": 2, **cost, "b_simple_last": measured[-1]["gns_b_simple"]
           if measured else None}
    if not ok:
        rec["log_tail"] = tail(out / "gns.log")
    share = cost.get("share_at_10")
    report("y.gns", (ok and share <= GNS_GOAL) if on_gpu and ok else (None if ok else False), rec,
           f"step {1e3 * cost.get('plain_step_s', float('nan')):.1f} ms, measuring step "
           f"{1e3 * cost.get('measured_step_s', float('nan')):.1f} ms: +{1e3 * cost.get('extra_s', float('nan')):.1f} ms "
           f"= {100 * (share if share is not None else float('nan')):.2f}% of a step at gns_every 10 "
           f"(goal <= {100 * GNS_GOAL:.0f}%); rc {rc}, {secs:.0f} s")
    sync_stage_row(args, report, out, "packed", {"packing": "ffd", "compile": "off"})
