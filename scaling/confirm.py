"""Fresh seeds at a grid's best learning rates: final losses and steps to a target with their spread.

    python -m scaling confirm --grid runs/scaling --output runs/scaling_confirm --seeds 1,2 \\
        --config ds_configs/cpu_seq128.json --data data/seq128 --batch-sizes 128,512,2048 \\
        --optimizers lamb,lars,adamw --samples 262144 --base-batch 128 \\
        --lr lamb=6e-3,adamw=1e-3,lars=1.0 --lr-rule sqrt [--train-target 6.5,6.3] [--power 0]

reruns, for each optimizer and batch, the learning rate that the grid (``--grid``, the output of
``python -m scaling grid``) found best on its own seed; the grid's ``--lr``, ``--base-batch``,
``--lr-rule`` and ``--samples`` are passed again (checked against its runs), another ``--power``
reruns them under that schedule. That pick rode on the seed's noise, so the picked run flatters its
lr; fresh seeds measure it without the pick, and their spread is the noise any comparison between
batches or optimizers has to beat. Runs go largest batch first; as in the grid, a finished run is
not run again and ``--summarize`` trains nothing. Outputs, in ``--output``:

- steps to a **training MLM loss** target (``--train-target``), read from the training records
  (``scaling/targets.py``: fresh samples within the first epoch, smoothed over ``--train-window``);
- steps to the held-out target, as the grid reads them (between its evaluations);
- per optimizer and batch: each seed's figures, their mean and range, and the grid's own seed
  (0) beside them, in ``seeds.md`` and ``seeds.json``; ``seeds.png`` draws the fresh seeds;
- per optimizer, the noise-scale prediction (``scaling/predict.py``) of the steps to the training
  target at every batch, from each fresh seed at its smallest batch: its noise-scale course and its
  steps to the target as read above;
- per optimizer and training target, McCandlish et al.'s S(B) = S_min·(1 + B_crit/B) fitted to
  the seeds' mean steps over the batches: the critical batch B_crit, beside the noise scale the
  smallest batch measured at that loss (the paper finds B_crit ≈ B_simple).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

from data_prep.atomic import write_json, write_text
from scaling import grid, predict
from scaling.targets import key, with_target


def _stats(values: list[Optional[float]]) -> dict:
    got = [v for v in values if v is not None and v == v]
    return {"values": values, "mean": sum(got) / len(got) if got else None,
            "min": min(got) if got else None, "max": max(got) if got else None,
            "missing": len(values) - len(got)}


def seed_summary(results: list[dict], source: list[dict], targets: list[float]) -> list[dict]:
    """Per (optimizer, batch) of the confirmation runs: the fresh seeds' final held-out losses and
    steps to the held-out and training targets, and the study's pick (seed 0, from ``source``)."""
    rows = []
    for opt, batch in sorted({(r["optimizer"], r["batch"]) for r in results}, key=lambda k: (k[1], k[0])):
        runs = sorted((r for r in results if r["optimizer"] == opt and r["batch"] == batch),
                      key=lambda r: r["seed_offset"])
        mult = runs[0]["lr_multiplier"]
        pick = next((s for s in source if s["optimizer"] == opt and s["batch"] == batch
                     and s.get("seed_offset", 0) == 0 and s["lr_multiplier"] == mult), None)
        rows.append({
            "optimizer": opt, "batch": batch, "lr": runs[0]["lr"], "lr_multiplier": mult,
            "seeds": [r["seed_offset"] for r in runs],
            "final_loss": _stats([r["final_loss"] for r in runs]),
            "steps_to_target": _stats([r.get("steps_to_target") for r in runs]),
            "train_steps_to_target": {key(t): _stats([(r.get("train_steps_to_target") or {}).get(key(t))
                                                      for r in runs]) for t in targets},
            "pick": None if pick is None else {"name": pick["name"], "final_loss": pick["final_loss"],
                                              "steps_to_target": pick.get("steps_to_target")}})
    return rows


def predictions(results: list[dict], out: Path, target: float) -> dict[str, dict]:
    """Per optimizer: the steps to the training MLM loss ``target`` predicted at every batch of
    ``results`` from each seed at the optimizer's smallest batch that reached it; per batch the
    mean over those seeds and the band (lowest low-noise to highest high-noise estimate)."""
    batches = sorted({r["batch"] for r in results})
    found: dict[str, dict] = {}
    for opt in sorted({r["optimizer"] for r in results}):
        small = min(r["batch"] for r in results if r["optimizer"] == opt)
        made = []
        for r in sorted(results, key=lambda r: r["name"]):
            steps = (r.get("train_steps_to_target") or {}).get(key(target))
            if r["optimizer"] == opt and r["batch"] == small and steps is not None:
                try:
                    made.append(predict.predict(out / r["name"], batches, target, "mlm_loss", run_steps=steps))
                except (FileNotFoundError, ValueError):
                    continue  # no noise-scale log: nothing to predict from
        if made:
            per_batch = []
            for i, b in enumerate(batches):
                at = [p["batches"][i] for p in made]
                ends = [x[k] for x in at for k in ("steps_low_noise", "steps_high_noise")]
                per_batch.append({"batch": b, "steps": sum(x["steps"] for x in at) / len(at),
                                  "low": min(ends), "high": max(ends)})
            found[opt] = {"from": [Path(p["run"]).name for p in made], "batch": small,
                          "noise_scale_at_target": [p["noise_scale_at_target"] for p in made],
                          "noise_scale_rel_err": [p["noise_scale_rel_err"] for p in made],
                          "batches": per_batch}
    return found


def fit_critical_batch(points: list[tuple[int, float]]) -> Optional[dict]:
    """McCandlish et al.'s S(B) = S_min·(1 + B_crit/B) fitted to (batch, steps) points: linear in
    1/B (S = a + b/B, S_min = a, B_crit = b/a), least squares on relative errors (weights 1/S²) so
    the small batches' large step counts do not outweigh the rest. None with fewer than 3 batches;
    without a positive S_min or B_crit, the two numbers are None and ``note`` says why."""
    pts = [(b, s) for b, s in points if s is not None and s > 0]
    if len({b for b, _ in pts}) < 3:
        return None
    sw = sx = sy = sxx = sxy = 0.0
    for b, steps in pts:
        w, x = 1.0 / steps ** 2, 1.0 / b
        sw, sx, sy, sxx, sxy = sw + w, sx + w * x, sy + w * steps, sxx + w * x * x, sxy + w * x * steps
    det = sw * sxx - sx * sx
    if det <= 0:
        return None
    a, slope = (sxx * sy - sx * sxy) / det, (sw * sxy - sx * sy) / det
    batches = sorted({b for b, _ in pts})
    if slope <= 0:
        return {"s_min": None, "b_crit": None, "batches": batches, "note": "steps did not fall with the batch"}
    if a <= 0:
        return {"s_min": None, "b_crit": None, "batches": batches,
                "note": "steps fell linearly or faster: B_crit above the largest batch"}
    worst = max(abs(a + slope / b - steps) / steps for b, steps in pts)
    return {"s_min": a, "b_crit": slope / a, "max_rel_residual": worst, "batches": batches, "note": None}


def critical_batches(rows: list[dict], targets: list[float], predicted: dict) -> list[dict]:
    """Per training target and optimizer: B_crit fitted to the seeds' mean steps over the batches
    where every seed reached the target (a mean over the seeds that did would be biased low),
    beside the noise scale B_simple the smallest batch's runs measured where they reached it (the
    paper's claim: B_crit ≈ B_simple)."""
    out = []
    for t in targets:
        for opt in sorted({r["optimizer"] for r in rows}):
            pts = [(r["batch"], r["train_steps_to_target"][key(t)]["mean"]) for r in rows
                   if r["optimizer"] == opt and not r["train_steps_to_target"][key(t)]["missing"]]
            fit = fit_critical_batch(pts)
            p = predicted.get(key(t), {}).get(opt)
            noise = p["noise_scale_at_target"] if p else []
            errs = p.get("noise_scale_rel_err", []) if p else []
            out.append({"train_target": t, "optimizer": opt, "fit": fit,
                        "noise_scale_at_target": sum(noise) / len(noise) if noise else None,
                        "noise_scale_rel_err": max(errs) if errs else None,
                        "noise_from": p["batch"] if p else None})
    return out


def _fmt(st: dict, digits: int, steps: bool = False) -> str:
    vals = ", ".join("–" if v is None else (f"{v:,.0f}" if steps else f"{v:.{digits}f}") for v in st["values"])
    if st["mean"] is None:
        return vals
    mean = f"{st['mean']:,.0f}" if steps else f"{st['mean']:.{digits}f}"
    return f"**{mean}** ({vals})"


def seeds_table(rows: list[dict], target: float, targets: list[float], window: float,
                predicted: Optional[dict] = None) -> str:
    """Markdown: per batch and optimizer, the fresh seeds' figures; per training target the steps
    each seed took and, after `→`, the noise-scale prediction (mean, band)."""
    predicted = predicted or {}
    lines = ["Fresh seeds at the study's best lr per optimizer and batch: mean **bold** (each seed). "
             f"Steps to held-out loss {target} are read between the study's evaluations; steps to a "
             f"training MLM loss from the training records, smoothed over {window:,.0f} samples; after → "
             "the steps the noise scale of the optimizer's seeds at its smallest batch predicts (mean; band). "
             "`–`: not reached. The study's own seed (its pick) is apart: it chose the lr.", "",
             "| batch | optimizer | lr (×) | final held-out loss | steps to held-out " f"{target} | "
             + "".join(f"steps to training {t:g} | " for t in targets) + "the pick (seed 0): final, steps |",
             "|---|---|---|---|---|" + "---|" * len(targets) + "---|"]
    for r in rows:
        pick = r["pick"]
        pick_s = "" if pick is None else (f"{pick['final_loss']:.3f}, " + (
            f"{pick['steps_to_target']:,.0f}" if pick["steps_to_target"] is not None else "–"))
        cells = []
        for t in targets:
            cell = _fmt(r["train_steps_to_target"][key(t)], 0, True)
            p = next((b for b in predicted.get(key(t), {}).get(r["optimizer"], {}).get("batches", [])
                      if b["batch"] == r["batch"]), None)
            src = predicted.get(key(t), {}).get(r["optimizer"], {}).get("batch")
            if p is not None and r["batch"] == src:
                cell += " (the prediction's input)"
            elif p is not None:
                cell += f" → {p['steps']:,.0f} ({p['low']:,.0f}–{p['high']:,.0f})"
            cells.append(cell)
        lines.append(f"| {r['batch']:,} | {r['optimizer']} | {r['lr']:.3g} (×{r['lr_multiplier']:.3g}) | "
                     f"{_fmt(r['final_loss'], 3)} | {_fmt(r['steps_to_target'], 0, True)} | "
                     + "".join(f"{c} | " for c in cells) + f"{pick_s} |")
    return "\n".join(lines) + "\n"


def critical_table(crit: list[dict]) -> str:
    lines = ["S(B) = S_min·(1 + B_crit/B) fitted to the mean steps per batch (relative least squares), "
             "and the noise scale B_simple measured at the target by the smallest batch's seeds (± the "
             "jackknife error at the end of the run, the largest over the seeds).", "",
             "| training target | optimizer | batches fitted | S_min | B_crit (fit) | worst misfit | "
             "B_simple at the target (batch) |", "|---|---|---|---|---|---|---|"]
    for c in crit:
        f = c["fit"]
        noise = "" if c["noise_scale_at_target"] is None else (
            f"{c['noise_scale_at_target']:.0f}" + (f" ±{100 * c['noise_scale_rel_err']:.0f}%"
                                                  if c.get("noise_scale_rel_err") else "") + f" (batch {c['noise_from']:,})")
        if f is None:
            lines.append(f"| {c['train_target']:g} | {c['optimizer']} | fewer than 3 where every seed reached it "
                         f"| | | | {noise} |")
        elif f["note"]:
            lines.append(f"| {c['train_target']:g} | {c['optimizer']} | {', '.join(f'{b:,}' for b in f['batches'])} | "
                         f"{f['note']} | | | {noise} |")
        else:
            lines.append(f"| {c['train_target']:g} | {c['optimizer']} | {', '.join(f'{b:,}' for b in f['batches'])} | "
                         f"{f['s_min']:,.0f} | {f['b_crit']:,.0f} | {100 * f['max_rel_residual']:.0f}% | {noise} |")
    return "\n".join(lines) + "\n"


def scheduler_power(run_dir: Path) -> Optional[float]:
    """The decay power of the WarmupPolyDecay schedule a run trained with (its config.effective.json);
    None when the run has no such record."""
    try:
        sched = json.loads((run_dir / "config.effective.json").read_text()).get("scheduler") or {}
        return float(sched["params"]["power"]) if sched.get("type") == "WarmupPolyDecay" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def schedule_note(warmup: float, power: float, study_power: Optional[float]) -> str:
    """One sentence for the tables: the schedule these runs trained with, and whether the study's
    pick trained with another (then its columns compare schedules, not seeds)."""
    shape = "constant" if power == 0 else f"(1 − t/T)^{power:g} to zero at the run's end"
    note = f"Learning rate: linear warmup over {warmup:.0%} of each run's steps, then {shape}."
    if study_power is not None and study_power != power:
        note += (f" The study's pick decayed with power {study_power:g}: its column compares the two "
                 "schedules, not seeds.")
    return note


def write_confirm_outputs(results: list[dict], source: list[dict], out: Path, target: float,
                          targets: Optional[list[float]], window: float, schedule: str = "") -> list[dict]:
    """seeds.json, seeds.md and seeds.png from the confirmation runs and the grid's (``source``)."""
    targets = targets or []
    rows = seed_summary(results, source, targets)
    predicted = {key(t): predictions(results, out, t) for t in targets}
    crit = critical_batches(rows, targets, predicted)
    write_json(out / "seeds.json", {"target_loss": target, "train_targets": targets, "train_window": window,
                                    "schedule": schedule, "rows": rows, "predicted": predicted,
                                    "critical_batch": crit})
    write_text(out / "seeds.md", (schedule + "\n\n" if schedule else "")
               + seeds_table(rows, target, targets, window, predicted)
               + ("\n" + critical_table(crit) if targets else ""))
    try:
        from scaling.plots import plot_confirm  # here, not at the top: matplotlib is optional
    except ImportError:
        pass  # grid.write_outputs has said that matplotlib is missing
    else:
        plot_confirm(results, rows, out, targets, window, predicted)
    return rows


def confirm_specs(args: argparse.Namespace) -> list[grid.RunSpec]:
    """The best lr of each (optimizer, batch) of a finished lr search (lowest final held-out loss
    with the grid's seed), run again with ``--seeds``: its lr was picked on that seed's noise, fresh
    seeds measure it without the pick's optimism. Largest batch first, seeds in the given order,
    optimizers side by side. ValueError when the grid has no results or ran other settings."""
    src = args.grid / "results.json"
    if not src.is_file():
        raise ValueError(f"--grid: {src} not found (the output of `python -m scaling grid`)")
    runs = json.loads(src.read_text())
    specs = []
    for (opt, batch), r in grid.best_per_batch(runs).items():
        if opt not in args.optimizers or batch not in args.batch_sizes:
            continue
        for seed in args.seeds:
            spec = grid.make_spec(args, opt, batch, r["lr_multiplier"], seed_offset=seed)
            if not math.isclose(spec.lr, r["lr"], rel_tol=1e-9) or spec.steps != r["steps"]:
                raise ValueError(f"--grid: {r['name']} in {args.grid} ran lr {r['lr']:.6g} for {r['steps']} "
                                 f"steps, this command gives lr {spec.lr:.6g} for {spec.steps}: pass the study's "
                                 "--lr, --base-batch, --lr-rule and --samples")
            specs.append(spec)
    if not specs:
        raise ValueError(f"--grid: {args.grid} has no finished run of {','.join(args.optimizers)} at batch "
                         f"{','.join(map(str, args.batch_sizes))}")
    return sorted(specs, key=lambda s: (-s.batch, args.seeds.index(s.seed_offset), args.optimizers.index(s.optimizer)))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """``python -m scaling confirm``: the grid to confirm, the seeds, and the grid's run flags."""
    ap.add_argument("--grid", type=Path, required=True, metavar="GRID_DIR",
                    help="a finished grid's --output: its best lr per optimizer and batch is rerun (pass the "
                         "grid's --lr, --base-batch, --lr-rule, --samples; another --power reruns them under "
                         "that schedule)")
    ap.add_argument("--seeds", type=grid.comma_list(int), default=[1, 2],
                    help="seed offsets to run, distinct and above 0 (0 is the grid's own seed)")
    grid.add_run_arguments(ap)


def check(args: argparse.Namespace) -> None:
    """Flags that do not fit together: ValueError, which the command line shows as a usage error."""
    grid.check(args)
    if args.grid.resolve() == args.output.resolve():
        raise ValueError("--grid GRID_DIR needs another --output")
    if 0 in args.seeds or len(set(args.seeds)) < len(args.seeds) or min(args.seeds) < 0:
        raise ValueError("--seeds: distinct seed offsets above 0 (0 is the study's own seed, already run)")


def run(args: argparse.Namespace) -> int:
    """The confirmation runs, then their outputs beside the grid's (results.csv, summary.json)."""
    try:
        specs = confirm_specs(args)
    except ValueError as exc:
        print(f"scaling confirm: {exc}", file=sys.stderr)
        return 2
    unigram = grid.start(args, len(specs))
    # the grid's own runs, timed to this command's target: the pick (seed 0) beside the fresh seeds
    source = [with_target(r, args.target_loss) for r in json.loads((args.grid / "results.json").read_text())]
    study_power = next((p for p in (scheduler_power(args.grid / r["name"]) for r in source) if p is not None), None)
    schedule = schedule_note(args.warmup, args.power, study_power)

    def outputs(rs: list[dict]) -> None:
        grid.write_outputs(rs, args.output, args.target_loss, unigram, study=False)
        write_confirm_outputs(rs, source, args.output, args.target_loss, args.train_target, args.train_window,
                              schedule)

    results: dict[int, dict] = {}
    missing = grid.run_specs(args, specs, range(len(specs)), results, outputs)
    if missing:
        print(f"scaling: {len(missing)} planned runs not finished: {', '.join(missing)}")
    return grid.finish(args, results, outputs)
