"""The study's figures: the grid's (``loss_vs_samples.png``, ``scaling.png``, ``noise_scale.png``),
confirm's (``seeds.png``) and predict's (``prediction.png``).

matplotlib is optional (``pip install .[study]``) and imported here at the top: the commands import
this module where they draw, and where it is missing they say so and write everything else.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

from data_prep.atomic import save_figure  # noqa: E402
from scaling.grid import best_per_batch, final_or_inf, steps_run  # noqa: E402
from scaling.targets import key, smoothed, train_curve  # noqa: E402


def plot_grid(results: list[dict], out: Path, target: float, prediction: Optional[dict] = None) -> None:
    """Held-out loss against samples per optimizer (best lr per batch); final loss and steps to
    ``target`` against the batch, with ideal linear scaling and the noise-scale ``prediction``;
    the noise scale over training."""
    best = best_per_batch(results)
    opts = sorted({r["optimizer"] for r in results})
    fig, axes = plt.subplots(1, len(opts), figsize=(5 * len(opts), 4), sharey=True, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for (o, batch), r in sorted(best.items()):
            if o == opt and r["evals"]:
                ax.plot([e["samples"] for e in r["evals"]], [e["eval_mlm_loss"] for e in r["evals"]],
                        marker="o", ms=3, label=f"batch {batch} (lr {r['lr']:.2g})")
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set(title=opt, xlabel="samples", xscale="log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels would overlap
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out MLM loss")
    fig.tight_layout()
    save_figure(fig, out / "loss_vs_samples.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    colour = {opt: f"C{i}" for i, opt in enumerate(opts)}
    for opt in opts:
        rows = sorted((b, r) for (o, b), r in best.items() if o == opt)
        a1.plot([b for b, _ in rows], [final_or_inf(r) for _, r in rows], marker="o", color=colour[opt], label=opt)
    fastest = best_per_batch(results, by="target")
    reached = {k for k, x in fastest.items() if x["steps_to_target"] is not None}
    for opt in opts:
        hits = sorted((b, fastest[(o, b)]["steps_to_target"]) for (o, b) in reached if o == opt)
        if hits:
            a2.plot([b for b, _ in hits], [s for _, s in hits], marker="o", color=colour[opt], label=opt)
        # Batches where no run of this optimizer reached the target: the steps it ran are a lower bound.
        short = sorted((b, steps_run(r)) for (o, b), r in best.items() if o == opt and (o, b) not in reached)
        if short:  # nudged sideways per optimizer: equal bounds at one batch stay visible
            nudge = 1.08 ** (opts.index(opt) - (len(opts) - 1) / 2)
            a2.scatter([b * nudge for b, _ in short], [s for _, s in short], marker="^", facecolors="none",
                       edgecolors=colour[opt], label=f"{opt}: not reached in its steps")
    batches = sorted({b for _, b in best})
    lamb_hits = [(b, r["steps_to_target"]) for (o, b), r in fastest.items()
                 if o == "lamb" and r["steps_to_target"] is not None]
    if lamb_hits:
        b0, s0 = min(lamb_hits)
        a2.plot(batches, [s0 * b0 / b for b in batches], "k--", lw=1, label="ideal linear scaling (from lamb)")
    if prediction is not None:  # over the study's batches (a prediction may reach 65,536)
        pb = [b for b in prediction["batches"] if min(batches) / 2 <= b["batch"] <= max(batches) * 2]
        a2.plot([b["batch"] for b in pb], [b["steps"] for b in pb], color="C3", lw=1.5,
                label=f"predicted by the noise scale of {Path(prediction['run']).name}")
        a2.fill_between([b["batch"] for b in pb], [min(b["steps_low_noise"], b["steps_high_noise"]) for b in pb],
                        [max(b["steps_low_noise"], b["steps_high_noise"]) for b in pb], color="C3", alpha=0.15, lw=0)
    a1.set(xscale="log", xlabel="global batch", ylabel="final held-out MLM loss", title="same samples, best lr")
    a2.set(xscale="log", yscale="log", xlabel="global batch", ylabel=f"steps to held-out loss {target}",
           title="steps to target, best lr")
    for ax in (a1, a2):
        if ax.get_legend_handles_labels()[0]:  # no curve when no run reached the target yet
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "scaling.png", dpi=120)
    plt.close(fig)

    courses = [(o, b, r) for (o, b), r in sorted(best.items()) if r.get("gns")]
    if courses:  # one panel per optimizer, batches coloured from small (dark) to large (light)
        gns_opts = sorted({o for o, _, _ in courses})
        all_batches = sorted({b for _, b, _ in courses})
        shade = {b: plt.cm.viridis(i / max(1, len(all_batches) - 1) * 0.9) for i, b in enumerate(all_batches)}
        fig, axes = plt.subplots(1, len(gns_opts), figsize=(4.5 * len(gns_opts), 4), sharey=True, squeeze=False)
        for ax, opt in zip(axes[0], gns_opts):
            for o, b, r in courses:
                if o == opt:
                    g = [x for x in r["gns"] if x.get("b_simple") is not None and x["b_simple"] > 0]
                    ax.plot([x["samples"] for x in g], [x["b_simple"] for x in g], lw=1.2, color=shade[b],
                            label=f"batch {b}")
            ax.set(xscale="log", yscale="log", xlabel="samples", title=f"{opt} (best lr per batch)")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("gradient noise scale B_simple")
        fig.tight_layout()
        save_figure(fig, out / "noise_scale.png", dpi=120)
        plt.close(fig)


def plot_confirm(results: list[dict], rows: list[dict], out: Path, targets: list[float], window: float,
                 predicted: dict) -> None:
    """Left: every run's smoothed training MLM loss; then per training target (the held-out target
    when none is given) the steps each seed took against the batch, their mean, the ideal linear
    line from the smallest batch's mean, and the prediction with its band."""
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


def plot_prediction(p: dict, path: Path) -> None:
    """A prediction's steps and samples against the batch, with its band, the run and S_min."""
    bs = [b["batch"] for b in p["batches"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    lo = [min(b["steps_low_noise"], b["steps_high_noise"]) for b in p["batches"]]
    hi = [max(b["steps_low_noise"], b["steps_high_noise"]) for b in p["batches"]]
    a1.plot(bs, [b["steps"] for b in p["batches"]], "C0-", label="predicted")
    a1.fill_between(bs, lo, hi, color="C0", alpha=0.2, lw=0, label="noise-scale error")
    a1.plot([p["run_batch"]], [p["run_steps"]], "ko", label="the run")
    a1.axhline(p["s_min"], color="grey", ls=":", lw=1, label="S_min")
    a2.plot(bs, [b["samples"] for b in p["batches"]], "C1-", label="predicted")
    a2.fill_between(bs, [x * b for x, b in zip(lo, bs)], [x * b for x, b in zip(hi, bs)], color="C1", alpha=0.2, lw=0)
    a2.plot([p["run_batch"]], [p["run_steps"] * p["run_batch"]], "ko", label="the run")
    a1.set(xscale="log", yscale="log", xlabel="global batch", ylabel="steps", title=f"steps to {p['loss']} "
           f"{p['target_loss']:.3f}")
    a2.set(xscale="log", yscale="log", xlabel="global batch", ylabel="samples", title="samples")
    for ax in (a1, a2):
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
