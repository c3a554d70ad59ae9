"""Predict, from one run's gradient noise scale, the steps and samples other batch sizes need to
reach the loss that run reached.

McCandlish et al. 2018 (arXiv 1812.06162, section 2.2): to reach a given loss, the number of
steps S and of samples E at batch B follow S = S_min·(1 + B_noise/B) and E = E_min·(1 + B/B_noise),
with B_noise ≈ B_simple = tr(Σ)/|G|², the noise scale ``pretrain/gns.py`` logs. The noise scale
grows as the loss falls, so the prediction integrates over the run: each step the run took at
batch B_run, with the noise scale B_n(t) of that moment, stands for 1/(1 + B_n(t)/B_run) steps of
an infinitely large batch, and for (1 + B_n(t)/B)/(1 + B_n(t)/B_run) steps at batch B. The band
comes from the noise scale's jackknife error at the end of the run, applied to the whole course.

    python -m scaling predict RUN_DIR [--batch-sizes 256,2048,32768,65536] [--target-loss L]
        [--output GRID_DIR]      (also overlay the prediction on a grid's scaling.png)

RUN_DIR is any run of ``pretrain/run.py`` that logged the noise scale (a grid's run, or one of
your own). Nothing trains: the prediction goes to ``RUN_DIR/prediction.json``, a table to stdout
and ``RUN_DIR/prediction.png`` (with matplotlib). The loss is the held-out MLM loss when the run
evaluated it (what the grid's targets are), else the training loss. With ``--output GRID_DIR``
(the output of ``python -m scaling grid``) the target is the grid's held-out target, and where
RUN_DIR is one of the grid's runs the grid keeps the prediction on its plot and in its
comparison.md as runs are added.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

from data_prep.atomic import write_json
from pretrain.metrics import read_records


def read_run(run_dir: Path) -> tuple[list[dict], int]:
    """(metrics records, global batch) of a run directory written by pretrain/run.py."""
    metrics = run_dir / "metrics.jsonl"
    cfg = run_dir / "config.effective.json"
    if not metrics.is_file() or not cfg.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (expected metrics.jsonl and config.effective.json)")
    return read_records(run_dir), int(json.loads(cfg.read_text())["train_batch_size"])


def loss_curve(records: list[dict], key: str = "auto") -> tuple[str, list[tuple[int, float]]]:
    """(which loss, [(step, loss)]): the held-out MLM loss when evaluated more than once, else the
    training loss; ``key="mlm_loss"``: the training MLM loss."""
    if key == "mlm_loss":
        return key, [(r["step"], r["mlm_loss"]) for r in records if r.get("mlm_loss") is not None]
    held = [(r["step"], r["eval_mlm_loss"]) for r in records if r.get("eval_mlm_loss") is not None]
    if key == "eval_mlm_loss" or (key == "auto" and len(held) > 1):
        return "eval_mlm_loss", held
    return "loss", [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]


def noise_curve(records: list[dict]) -> list[tuple[int, float, Optional[float]]]:
    return [(r["step"], r["gns_b_simple"], r.get("gns_b_simple_err")) for r in records
            if r.get("gns_b_simple") is not None and math.isfinite(r["gns_b_simple"]) and r["gns_b_simple"] > 0]


def steps_to(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """First step at which the logged loss reaches ``target``, interpolated between log points."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def noise_at(curve: list[tuple[int, float, Optional[float]]], step: float) -> float:
    """The noise scale at ``step``: linear between log points, the first value before them."""
    if step <= curve[0][0]:
        return curve[0][1]
    for (s0, b0, _), (s1, b1, _) in zip(curve, curve[1:]):
        if step <= s1:
            return b0 + (b1 - b0) * (step - s0) / (s1 - s0)
    return curve[-1][1]


def predict(run_dir: Path, batch_sizes: list[int], target: Optional[float] = None, key: str = "auto",
            run_steps: Optional[float] = None) -> dict:
    """``run_steps``: the steps the run took to ``target`` when the caller read them its own way
    (scaling.confirm smooths the training loss first); default: from the logged curve."""
    records, b_run = read_run(Path(run_dir))
    (which, losses), noise = loss_curve(records, key), noise_curve(records)
    if not losses:
        names = {"eval_mlm_loss": "held-out loss (eval_mlm_loss)", "mlm_loss": "training MLM loss"}
        what = names.get(which, "training loss")
        raise ValueError(f"{run_dir}: no {what} in metrics.jsonl")
    if not noise:
        raise ValueError(f"{run_dir}: no gradient noise scale in metrics.jsonl (pretrain.gns_every was 0, or "
                         "the run had one micro-batch per step)")
    if target is None:  # the loss the run reached (training loss: the mean of its last three log points)
        tail = losses[-1:] if which == "eval_mlm_loss" else losses[-3:]
        target = sum(loss for _, loss in tail) / len(tail)
    s_run = steps_to(losses, target) if run_steps is None else run_steps
    if s_run is None:
        raise ValueError(f"{run_dir}: the run never reached {which} {target:.4f} (its lowest: "
                         f"{min(loss for _, loss in losses):.4f})")
    err = noise[-1][2]
    rel = (err / noise[-1][1]) if err else 0.0
    out = {"run": str(run_dir), "run_batch": b_run, "loss": which, "target_loss": target, "run_steps": s_run,
           "noise_scale_at_target": noise_at(noise, s_run), "noise_scale_rel_err": rel, "batches": []}
    n = max(1, int(math.ceil(s_run)))
    # An error bar wider than the value itself leaves the low end at 0 (a noise scale is not negative).
    for factor, key in ((1.0, ""), (max(0.0, 1.0 - rel), "_low_noise"), (1.0 + rel, "_high_noise")):
        bn = [factor * noise_at(noise, t + 0.5) for t in range(n)]
        weight = [min(1.0, s_run - t) for t in range(n)]  # the last step counts in part
        s_min = sum(w / (1 + b / b_run) for w, b in zip(weight, bn))
        out["s_min" + key] = s_min
        for i, B in enumerate(batch_sizes):
            steps = sum(w * (1 + b / B) / (1 + b / b_run) for w, b in zip(weight, bn))
            if key == "":
                out["batches"].append({"batch": B, "steps": steps, "samples": steps * B})
            else:
                out["batches"][i]["steps" + key] = steps
    return out


def print_prediction(p: dict) -> None:
    print(f"\nprediction from {p['run']}: batch {p['run_batch']} reached {p['loss']} {p['target_loss']:.4f} in "
          f"{p['run_steps']:.0f} steps; noise scale there {p['noise_scale_at_target']:.4g} "
          f"(±{100 * p['noise_scale_rel_err']:.0f}%), S_min {p['s_min']:.0f} steps")
    print(f"{'batch':>8s} {'steps':>10s} {'band':>19s} {'samples':>14s} {'steps vs run':>13s}")
    for b in p["batches"]:
        lo, hi = sorted((b["steps_low_noise"], b["steps_high_noise"]))
        print(f"{b['batch']:8d} {b['steps']:10.0f} {f'{lo:.0f}-{hi:.0f}':>19s} {b['samples']:14,.0f} "
              f"{b['steps'] / p['run_steps']:12.3f}x")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """``python -m scaling predict``."""
    ap.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory of pretrain/run.py")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="default: powers of 2 from the run's batch / 8 to 65,536 (32k and 64k included)")
    ap.add_argument("--target-loss", type=float, default=None,
                    help="default: the loss the run reached (with --output: the grid's --target-loss)")
    ap.add_argument("--output", type=Path, default=None, metavar="GRID_DIR",
                    help="a grid's output: overlay on its scaling.png")


def run(args: argparse.Namespace) -> int:
    """The prediction for RUN_DIR; exit status 2 with one line when the run cannot give one."""
    grid_results = None
    try:
        _, b_run = read_run(args.run_dir)
        powers = {2 ** k for k in range(max(0, b_run.bit_length() - 4), 17)} | {32768, 65536}  # from batch / 8
        batches = args.batch_sizes or sorted(powers)
        target, key = args.target_loss, "auto"
        if args.output is not None:
            summary = args.output / "summary.json"
            if not (args.output / "results.json").is_file() or not summary.is_file():
                raise FileNotFoundError(f"{args.output}: no results.json/summary.json of a scaling grid")
            grid_results = json.loads((args.output / "results.json").read_text())
            if target is None:
                target = json.loads(summary.read_text())["target_loss"]
            key = "eval_mlm_loss"  # the grid's targets are held-out losses
            batches = sorted(set(batches) | {r["batch"] for r in grid_results})
        p = predict(args.run_dir, batches, target, key)
    except (FileNotFoundError, ValueError) as exc:
        print(f"scaling predict: {exc}", file=sys.stderr)
        return 2
    write_json(args.run_dir / "prediction.json", p)
    print_prediction(p)
    try:
        from scaling import plots  # here, not at the top: matplotlib is optional
    except ImportError:
        print("scaling: matplotlib is not installed; no plots", file=sys.stderr)
    else:
        plots.plot_prediction(p, args.run_dir / "prediction.png")
        if grid_results is not None:
            plots.plot_grid(grid_results, args.output, p["target_loss"], prediction=p)
    print(json.dumps({"prediction": str(args.run_dir / "prediction.json"), "target_loss": p["target_loss"],
                      "steps": {b["batch"]: round(b["steps"], 1) for b in p["batches"]}}))
    return 0
