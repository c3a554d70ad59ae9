"""Fresh seeds at a study's best learning rates: final losses and steps to a target with their spread.

``python -m pretrain.scaling --confirm GRID_DIR --seeds 1,2 --output CONFIRM_DIR ...`` reruns, for
each optimizer and batch, the learning rate that the study (GRID_DIR) found best on its own seed.
That pick rode on the seed's noise, so the picked run flatters its lr; fresh seeds measure it
without the pick, and their spread is the noise any comparison between batches or optimizers has
to beat. This module reads them back:

- steps to a **training MLM loss** target (``--train-target``), timed from the training records:
  every training sample is fresh while a run stays within its first epoch, so the training MLM
  loss of an interval estimates the loss on unseen text (with dropout on: it sits above the
  held-out loss by a gap of its own). A record is the mean over the steps since the previous
  one; it stands at the middle of its interval, and is averaged with its neighbours over a window
  of ``--train-window`` samples (the same at every batch) before the first crossing is read;
- steps to the held-out target, as the study reads them (between its evaluations);
- per optimizer and batch: each seed's figures, their mean and range, and the study's own seed
  (0) beside them, in ``seeds.md`` and ``seeds.json``; ``seeds.png`` draws the fresh seeds;
- per optimizer, the noise-scale prediction (``pretrain/predict.py``) of the steps to the training
  target at every batch, from each fresh seed at its smallest batch: its noise-scale course and its
  steps to the target as read above;
- per optimizer and training target, McCandlish et al.'s S(B) = S_min·(1 + B_crit/B) fitted to
  the seeds' mean steps over the batches: the critical batch B_crit, beside the noise scale the
  smallest batch measured at that loss (the paper finds B_crit ≈ B_simple).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from data_prep.atomic import save_figure, write_json, write_text
from pretrain.metrics import read_records


def train_curve(run_dir: Path, batch: int) -> list[dict]:
    """The run's training MLM loss records of its first epoch: [{"step", "samples", "width" (the
    samples it averages), "mlm_loss"}]; empty when the run did not log it. A record at step s
    averages the losses of steps prev+1..s, and step k's loss is that of the weights after k-1
    updates (k-1 batches trained on, as a held-out evaluation at step k-1 counts them): it stands
    at (prev + s - 1)/2 batches. After the first epoch the samples are no longer fresh: left out."""
    out: list[dict] = []
    prev = 0
    for rec in read_records(run_dir):
        if rec.get("mlm_loss") is None or "step" not in rec:
            continue
        if rec.get("epoch", 0) > 0:
            break
        step = rec["step"]
        if step > prev and math.isfinite(rec["mlm_loss"]):
            out.append({"step": step, "samples": (prev + step - 1) / 2 * batch, "width": (step - prev) * batch,
                        "mlm_loss": rec["mlm_loss"]})
        prev = max(prev, step)
    return out


def smoothed(curve: list[dict], window: float) -> list[float]:
    """Each record's loss averaged over ``window`` samples centred on it: every record weighs by the
    samples its interval shares with the window (the same span at every batch and log interval;
    one-sided at the ends of the run)."""
    out = []
    for c in curve:
        lo, hi = c["samples"] - window / 2, c["samples"] + window / 2
        total = weight = 0.0
        for d in curve:
            w = min(hi, d["samples"] + d["width"] / 2) - max(lo, d["samples"] - d["width"] / 2)
            if w > 0:
                total, weight = total + w * d["mlm_loss"], weight + w
        out.append(total / weight if weight > 0 else c["mlm_loss"])
    return out


def samples_to_target(curve: list[dict], target: float, window: float) -> Optional[float]:
    """Samples at which the smoothed training MLM loss first reaches ``target``, interpolated
    linearly between the records on either side; None if it never does."""
    ys = smoothed(curve, window)
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return curve[0]["samples"]
            x0, x1, y0 = curve[i - 1]["samples"], curve[i]["samples"], ys[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x1 - x0)
    return None


def key(target: float) -> str:
    """A training target as a JSON key."""
    return f"{target:g}"


def with_train_target(result: dict, run_dir: Path, targets: Optional[list[float]], window: float) -> dict:
    """Adds ``train_steps_to_target`` to a scaling result: {target: steps (None: not reached or not
    logged)} for each training MLM loss target."""
    curve = train_curve(run_dir, result["batch"]) if targets else []
    steps = {}
    for t in targets or []:
        samples = samples_to_target(curve, t, window)
        steps[key(t)] = None if samples is None else samples / result["batch"]
    result["train_steps_to_target"] = steps
    return result


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
    from pretrain import predict as pred

    batches = sorted({r["batch"] for r in results})
    found: dict[str, dict] = {}
    for opt in sorted({r["optimizer"] for r in results}):
        small = min(r["batch"] for r in results if r["optimizer"] == opt)
        made = []
        for r in sorted(results, key=lambda r: r["name"]):
            steps = (r.get("train_steps_to_target") or {}).get(key(target))
            if r["optimizer"] == opt and r["batch"] == small and steps is not None:
                try:
                    made.append(pred.predict(out / r["name"], batches, target, "mlm_loss", run_steps=steps))
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
        plot_confirm(results, rows, out, targets, window, predicted)
    except ImportError:
        pass  # scaling.write_outputs has said that matplotlib is missing
    return rows


def plot_confirm(results: list[dict], rows: list[dict], out: Path, targets: list[float], window: float,
                 predicted: dict) -> None:
    """Left: every run's smoothed training MLM loss; then per training target (the held-out target
    when none is given) the steps each seed took against the batch, their mean, the ideal linear
    line from the smallest batch's mean, and the prediction with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = sorted({r["optimizer"] for r in rows})
    colour = {o: f"C{i}" for i, o in enumerate(opts)}
    panels = [("train", t) for t in targets] or [("held-out", None)]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.2 * (1 + len(panels)), 4), squeeze=False)
    a1 = axes[0][0]
    batches = sorted({r["batch"] for r in rows})
    shade = {b: 0.35 + 0.65 * i / max(1, len(batches) - 1) for i, b in enumerate(batches)}
    drawn = False
    for r in results:  # training MLM curves, smoothed as they are read
        curve = train_curve(out / r["name"], r["batch"])
        if curve:
            drawn = True
            a1.plot([c["samples"] for c in curve], smoothed(curve, window), lw=0.9, color=colour[r["optimizer"]],
                    alpha=shade[r["batch"]])
    for o in opts:
        a1.plot([], [], color=colour[o], label=f"{o} (darker: larger batch)")
    for t in targets:
        a1.axhline(t, color="grey", ls=":", lw=1)
    a1.set(xscale="log" if drawn else "linear", xlabel="samples", ylabel=f"training MLM loss (smoothed over {window:,.0f} samples)",
           title="every run")
    a1.legend(fontsize=7)
    ran = {(r["optimizer"], r["batch"]): r.get("steps") for r in results}
    for ax, (kind, t) in zip(axes[0][1:], panels):
        def stats(r):
            return r["train_steps_to_target"][key(t)] if kind == "train" else r["steps_to_target"]

        for o in opts:
            pts = [(r["batch"], v) for r in rows if r["optimizer"] == o for v in stats(r)["values"] if v is not None]
            # the mean where every seed got there (as the fit); where one did not, the steps it ran: a lower bound
            means = [(r["batch"], math.nan if stats(r)["missing"] else stats(r)["mean"]) for r in rows
                     if r["optimizer"] == o]  # NaN: the line breaks there
            short = [(r["batch"], ran.get((o, r["batch"]))) for r in rows if r["optimizer"] == o and stats(r)["missing"]
                     and ran.get((o, r["batch"]))]
            if pts:
                ax.scatter([b for b, _ in pts], [v for _, v in pts], s=14, color=colour[o], alpha=0.6)
            if any(v == v for _, v in means):
                ax.plot([b for b, _ in means], [v for _, v in means], marker="o", color=colour[o], label=f"{o} (mean)")
            if short:
                ax.scatter([b for b, _ in short], [v for _, v in short], marker="^", s=40, facecolors="none",
                           edgecolors=colour[o], label=f"{o}: a seed not there in the steps it ran")
        for o, p in (predicted.get(key(t), {}) if kind == "train" else {}).items():
            ax.plot([b["batch"] for b in p["batches"]], [b["steps"] for b in p["batches"]], ls=":", color=colour[o],
                    label=f"{o}: predicted from batch {p['batch']}")
            ax.fill_between([b["batch"] for b in p["batches"]], [b["low"] for b in p["batches"]],
                            [b["high"] for b in p["batches"]], color=colour[o], alpha=0.1, lw=0)
        for o in opts:  # ideal linear scaling from each optimizer's smallest batch
            firsts = [(r["batch"], stats(r)["mean"]) for r in rows if r["optimizer"] == o and stats(r)["mean"] is not None]
            if firsts:
                b0, s0 = min(firsts)
                ax.plot(batches, [s0 * b0 / b for b in batches], "--", color=colour[o], lw=0.8,
                        label=f"{o}: linear scaling from batch {b0}")
        what = f"training MLM loss {t:g}" if kind == "train" else "the held-out target"
        ax.set(xscale="log", yscale="log", xlabel="global batch", ylabel=f"steps to {what}",
               title=f"steps to {what}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "seeds.png", dpi=120)
    plt.close(fig)
