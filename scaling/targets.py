"""When a run reaches a loss target: the held-out MLM loss between the study's evaluations, and the
training MLM loss read from the training records.

Every grid and confirm run is timed both ways (``--target-loss``, ``--train-target``). The held-out
loss is evaluated a few times per run (``--eval-points``); the training loss is logged far more
often, and every training sample is fresh while a run stays within its first epoch, so the training
MLM loss of an interval estimates the loss on unseen text (with dropout on: it sits above the
held-out loss by a gap of its own). A training record is the mean over the steps since the previous
one; it stands at the middle of its interval, and is averaged with its neighbours over a window of
``--train-window`` samples (the same at every batch) before the first crossing is read.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from pretrain.metrics import read_records

TRAIN_WINDOW = 8192  # samples the training MLM loss is smoothed over before steps to --train-target are read


def with_target(result: dict, target: float) -> dict:
    """Set when held-out loss first reaches ``target`` (None if never): linear interpolation in
    samples between the evaluations on either side, so the figure does not jump by a whole
    evaluation interval; the first evaluation itself when it is already at or below."""
    evals = result.get("evals", [])
    at = next((i for i, e in enumerate(evals) if e["eval_mlm_loss"] <= target), None)
    samples = None
    if at is not None:
        samples = float(evals[at]["samples"])
        if at > 0:
            a, b = evals[at - 1], evals[at]
            frac = (a["eval_mlm_loss"] - target) / (a["eval_mlm_loss"] - b["eval_mlm_loss"])
            samples = a["samples"] + frac * (b["samples"] - a["samples"])
    result["samples_to_target"] = samples
    result["steps_to_target"] = None if samples is None else samples / result["batch"]
    return result


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
    """Adds ``train_steps_to_target`` to a run's result: {target: steps (None: not reached or not
    logged)} for each training MLM loss target."""
    curve = train_curve(run_dir, result["batch"]) if targets else []
    steps = {}
    for t in targets or []:
        samples = samples_to_target(curve, t, window)
        steps[key(t)] = None if samples is None else samples / result["batch"]
    result["train_steps_to_target"] = steps
    return result
