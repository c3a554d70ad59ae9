"""The grid: the same number of samples at several batch sizes and optimizers.

    python -m scaling grid --config ds_configs/cpu_seq128.json --data data/seq128 \\
        --output runs/scaling --batch-sizes 128,512,2048 --optimizers lamb,lars,adamw \\
        --samples 262144 --base-batch 128 --lr lamb=6e-3,adamw=1e-3,lars=1.0 --lr-rule sqrt \\
        [--lr-multipliers 0.5,1,2] [--warmup 0.1] [--np 2] [--parallel 1] [--target-loss 4.5]

Every run is ``pretrain/run.py`` itself (same code, DeepSpeed engine, our optimizers), launched
with the config's settings plus: the global batch, ``max_steps = samples / batch``, the learning
rate scaled from ``--base-batch`` by ``--lr-rule`` (sqrt: the LAMB paper's rule; linear), the
warmup as a fraction of the steps, and gradient accumulation when the batch does not fit
(``--micro-batch``). ``--lr-multipliers`` adds a small learning-rate search around the scaled
rate at the smallest and the largest batch.

Held-out MLM loss is recorded at ``--eval-points`` points of each run, against steps and samples.
Results: ``OUTPUT/results.csv`` (every evaluation), ``OUTPUT/results.json`` (every run's result),
``OUTPUT/summary.json`` (per run: final held-out loss, steps and samples to ``--target-loss``, wall
time), ``OUTPUT/comparison.md``, plots ``loss_vs_samples.png``, ``scaling.png`` and
``noise_scale.png`` (with matplotlib), and a table on stdout. A finished run (its ``result.json``
exists) is not run again: rerun the same command after an interruption, or in the background with
``nohup``; rerun with another ``--target-loss`` to recompute the summary without training.

Runs go in an order that leaves the most telling ones done first if the grid is stopped early
(see ``run_priority``); ``--summarize`` writes the outputs from the finished runs alone.
``--parallel N`` runs N runs at once, each with its share of the CPU threads and its own port:
small models on few cores train more samples per second as several single-thread processes
(measured on 2 cores, bert-tiny at seq 64: 2 x 255 samples/s against 400 for one process).

Then ``python -m scaling confirm --grid OUTPUT ...`` reruns the best lrs with fresh seeds
(``scaling/confirm.py``), and ``python -m scaling predict RUN_DIR --output OUTPUT`` draws a
run's noise-scale prediction on ``scaling.png`` beside the measured points (``scaling/predict.py``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from data_prep.atomic import atomic_path, write_json, write_text
from optim.schedules import scale_lr
from pretrain.checkpoint import checkpoint_dirs
from pretrain.metrics import read_records
from scaling.targets import TRAIN_WINDOW, with_target, with_train_target

REPO = Path(__file__).resolve().parents[1]

OPTIMIZERS = {
    # name -> optimizer block (lr filled in); LAMB as NVIDIA's recipe, LARS on momentum SGD.
    "lamb": lambda lr: {"type": "Lamb", "params": {"lr": lr, "weight_decay": 0.01, "variant": "nvidia"}},
    "adamw": lambda lr: {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "eps": 1e-6}},
    "lars": lambda lr: {"type": "Lars", "params": {"lr": lr, "momentum": 0.9, "weight_decay": 0.01,
                                                   "trust_coefficient": 0.001}},
}


@dataclass
class RunSpec:
    optimizer: str
    batch: int
    lr: float
    lr_multiplier: float
    steps: int
    micro_batch: int
    seed_offset: int = 0  # 0: the study's seed; k: a repeat with seed + k (the noise between runs)

    @property
    def name(self) -> str:
        return f"{self.optimizer}_b{self.batch}_lrx{self.lr_multiplier:g}" + (f"_s{self.seed_offset}"
                                                                             if self.seed_offset else "")



def run_process(cmd, **kwargs):
    """One training run as a child process (a seam for the tests, which replace this function,
    never subprocess.run itself: other libraries call that, matplotlib's font cache among them)."""
    return subprocess.run(cmd, **kwargs)


def cpu_count():
    return os.cpu_count()

def plan(args) -> list[RunSpec]:
    """Every (optimizer, batch, lr multiplier) to run: the multipliers at the smallest and largest
    batch, at every batch for the optimizers in ``--search-all``; optimizers in ``--ends-only``
    run at the smallest and largest batch only."""
    batches = sorted(args.batch_sizes)
    specs = []
    for opt in args.optimizers:
        for batch in batches:
            ends = batch in (batches[0], batches[-1])
            if opt in getattr(args, "ends_only", []) and not ends:
                continue
            mults = args.lr_multipliers if ends or opt in getattr(args, "search_all", []) else [1.0]
            for mult in mults:
                steps = args.samples // batch
                if steps < 1:
                    raise ValueError(f"--samples {args.samples} is less than one step at batch {batch}")
                specs.append(make_spec(args, opt, batch, mult))
    return specs


def make_spec(args, opt: str, batch: int, mult: float, seed_offset: int = 0) -> RunSpec:
    """A run at the scaled lr x ``mult``. Every step has at least two micro-batches in all
    (accumulation or ranks), so the run measures its gradient noise scale."""
    lr = scale_lr(args.lr[opt], args.base_batch, batch, args.lr_rule) * mult
    per_rank = batch // args.np
    micro = min(args.micro_batch, per_rank if args.np > 1 or per_rank < 2 else per_rank // 2)
    while per_rank % micro:
        micro -= 1
    return RunSpec(opt, batch, lr, mult, args.samples // batch, micro, seed_offset)


def run_priority(spec: RunSpec, specs: list[RunSpec], optimizers: list[str]) -> tuple:
    """Execution order, so that a grid stopped early holds the most telling runs: the scaled
    lr at the smallest, largest and second-smallest batch; the lr search at the largest batch
    (where the scaling rule is least sure); the higher lr at the smallest; the other batches at
    the scaled lr; then the search at the other batches, largest first (the scaled lr is
    extrapolated furthest there), the lower lr at the smallest last. Optimizers alternate
    within each tier."""
    batches = sorted({s.batch for s in specs})
    small, large = batches[0], batches[-1]
    second = batches[1] if len(batches) > 2 else None
    if spec.lr_multiplier == 1.0 and spec.batch in (small, large, second):
        tier = 0
    elif spec.batch == large:
        tier = 1
    elif spec.batch == small and spec.lr_multiplier > 1.0:
        tier = 2
    elif spec.lr_multiplier == 1.0:
        tier = 3
    else:
        tier = 4
    return tier, -spec.batch if tier == 4 else spec.batch, spec.lr_multiplier, optimizers.index(spec.optimizer)


def run_one(spec: RunSpec, args, out: Path, slot: int = 0) -> dict:
    """Train one run (or read its stored result); ``slot`` picks its port when runs share the machine."""
    run_dir = out / spec.name
    done = run_dir / "result.json"
    if done.is_file():
        return with_targets(json.loads(done.read_text()), run_dir, args)
    eval_every = max(1, spec.steps // args.eval_points)
    sets = {
        "optimizer": json.dumps(OPTIMIZERS[spec.optimizer](spec.lr)),
        "scheduler": json.dumps({"type": "WarmupPolyDecay", "params": {"warmup_proportion": args.warmup,
                                                                       "power": args.power}}),
        "pretrain.eval_every": eval_every, "pretrain.eval_samples": args.eval_samples,
        "pretrain.log_every": log_every(spec.steps), "pretrain.checkpoint_every": 0,
        "pretrain.keep_checkpoints": 1, "pretrain.tensorboard": "false",
    }
    if spec.optimizer != "lamb":
        sets["gradient_clipping"] = 1.0
    port = args.master_port + slot
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.np),
           "--master_port", str(port), str(REPO / "pretrain" / "run.py")] if args.np > 1 else \
          [sys.executable, str(REPO / "pretrain" / "run.py")]
    cmd += ["--config", str(args.config), "--data", str(args.data), "--output", str(run_dir),
            "--train-batch-size", str(spec.batch), "--micro-batch-size", str(spec.micro_batch),
            "--max-steps", str(spec.steps), "--seed", str(args.seed + spec.seed_offset)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    if checkpoint_dirs(run_dir / "checkpoints"):
        cmd.append("--resume")  # a complete checkpoint resumes; unfinished saves only: from step 0
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(port))
    if getattr(args, "parallel", 1) > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (cpu_count() or 1) // (args.parallel * args.np)))
    t0 = time.time()
    with open(run_dir / "log.txt", "a") as logf:
        proc = run_process(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    evals = read_evals(run_dir, spec)
    result = {**asdict(spec), "name": spec.name, "exit_code": proc.returncode, "wall_s": wall, "evals": evals,
              "gns": read_noise(run_dir, spec.batch),
              "final_loss": evals[-1]["eval_mlm_loss"] if evals else math.nan,
              "diverged": proc.returncode == 3}
    with_targets(result, run_dir, args)
    if proc.returncode in (0, 3):  # finished, or stopped on a non-finite loss: both are results
        write_json(done, result)  # last: its presence means the run is finished
        compact(run_dir)
    return result


def log_every(steps: int) -> int:
    """Training-loss records every 50 steps at most, and 50 or more per run where it has 100 steps or
    more: the training MLM loss (fresh samples while a run stays within one epoch) then times a
    target far more finely than 8 held-out evaluations, an eighth of the run apart, can."""
    return max(1, min(50, steps // 50))



def compact(run_dir: Path) -> None:
    """What a finished run keeps (small enough to commit, so a study spread over sessions adds
    up): result.json, metrics.jsonl, config.effective.json and the log's last 200 lines."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    log = run_dir / "log.txt"
    if log.is_file():
        lines = log.read_text(errors="replace").splitlines()
        if len(lines) > 200:
            write_text(log, "\n".join(["[... earlier lines dropped]"] + lines[-200:]) + "\n")


def with_targets(result: dict, run_dir: Path, args) -> dict:
    """Steps to the held-out target and, with ``--train-target``, to each training MLM loss target."""
    with_target(result, args.target_loss)
    return with_train_target(result, run_dir, getattr(args, "train_target", None),
                             getattr(args, "train_window", TRAIN_WINDOW))



def read_noise(run_dir: Path, batch: int) -> list[dict]:
    """The run's gradient noise scale over training (moving averages as logged)."""
    return [{"step": rec["step"], "samples": rec["step"] * batch, "loss": rec.get("loss"),
             "b_simple": rec["gns_b_simple"], "err": rec.get("gns_b_simple_err")}
            for rec in read_records(run_dir) if rec.get("gns_b_simple") is not None]


def read_evals(run_dir: Path, spec: RunSpec) -> list[dict]:
    evals = {}
    for rec in read_records(run_dir):
        if "eval_mlm_loss" in rec:
            evals[rec["step"]] = {"step": rec["step"], "samples": rec["step"] * spec.batch,
                                  "eval_mlm_loss": rec["eval_mlm_loss"], "eval_mlm_acc": rec["eval_mlm_acc"],
                                  "eval_nsp_acc": rec["eval_nsp_acc"]}
    return [evals[s] for s in sorted(evals)]


def unigram_entropy(data_dir: Path) -> Optional[float]:
    """Cross-entropy (nats) of the held-out tokens under the training tokens' unigram frequencies:
    the MLM loss of a model that ignores context (masks fall uniformly on non-special tokens), the
    plateau a run must get below to have learned anything from context."""
    import numpy as np

    from data_prep import shardio

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    held = set((manifest.get("split") or {}).get("heldout_shards", [])) or {manifest["num_shards"] - 1}
    vocab = int(manifest["vocab"]["size"])
    special = list(manifest["vocab"]["special_ids"].values())
    counts = {True: np.zeros(vocab, np.int64), False: np.zeros(vocab, np.int64)}
    for k, shard in enumerate(manifest["shards"]):
        arrays, _ = shardio.open_arrays(Path(data_dir) / shard["path"])
        counts[k in held] += np.bincount(arrays["tokens"].astype(np.int64), minlength=vocab)
    for c in counts.values():
        c[special] = 0
    train, test = counts[False], counts[True]
    if test.sum() == 0:
        return None
    p = (train + 1) / (train.sum() + vocab)  # add-one: a held-out token unseen in training has a price
    return float(-(test * np.log(p)).sum() / test.sum())


def best_per_batch(results: list[dict], by: str = "final") -> dict[tuple[str, int], dict]:
    """The best run of each (optimizer, batch) over the learning-rate search: lowest final loss
    (``by="final"``) or fewest steps to the target (``by="target"``, runs that reach it only).
    Repeats with another seed are not candidates (they measure the noise between runs)."""
    def score(r):
        if by == "final":
            return final_or_inf(r)
        return r["steps_to_target"] if r["steps_to_target"] is not None else math.inf

    best: dict[tuple[str, int], dict] = {}
    for r in results:
        if r.get("seed_offset", 0):
            continue
        key = (r["optimizer"], r["batch"])
        if key not in best or score(r) < score(best[key]):
            best[key] = r
    return best


def best_for_target(results: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (optimizer, batch): the fastest run to the target; where none reached it, the lowest final loss."""
    by_final = best_per_batch(results)
    return {k: (r if r["steps_to_target"] is not None else by_final[k])
            for k, r in best_per_batch(results, by="target").items()}


def tried_multipliers(results: list[dict], opt: str, batch: int) -> list[float]:
    """The lr multipliers searched for (opt, batch), repeats with another seed left out."""
    return sorted({x.get("lr_multiplier", 1.0) for x in results if x["optimizer"] == opt and x["batch"] == batch
                   and not x.get("seed_offset", 0)})


def steps_run(r: dict) -> int:
    """The steps a run did (fewer than planned if it stopped early), a lower bound where it missed the target."""
    return r["evals"][-1]["step"] if r["evals"] else r["steps"]


def final_or_inf(r: dict) -> float:
    """The run's final held-out loss, to rank runs by: a diverged run's NaN as infinity."""
    v = r["final_loss"]
    return v if v == v else math.inf  # NaN (diverged) sorts last


def scaling_summary(results: list[dict]) -> dict[str, list[dict]]:
    """Per optimizer and batch, the fewest steps to the target over the lr search, and the samples
    that took relative to the smallest batch: 1.0 is perfect linear scaling (k times the batch,
    1/k the steps), k means the larger batch bought no step reduction at all."""
    best = best_for_target(results)
    out: dict[str, list[dict]] = {}
    for opt in sorted({o for o, _ in best}):
        rows = sorted((b, r) for (o, b), r in best.items() if o == opt)
        ref = rows[0][1]["samples_to_target"]
        out[opt] = []
        for b, r in rows:
            mult = r.get("lr_multiplier", 1.0)
            tried = tried_multipliers(results, opt, b)
            repeats = [x["steps_to_target"] for x in results if x["optimizer"] == opt and x["batch"] == b
                       and x.get("lr_multiplier", 1.0) == mult and x.get("seed_offset", 0)]
            out[opt].append({
                "batch": b, "lr": r["lr"], "lr_multiplier": mult, "lr_multipliers_tried": tried,
                "best_lr_at_edge": len(tried) > 1 and mult in (tried[0], tried[-1]),
                "steps_to_target": r["steps_to_target"], "steps_to_target_other_seeds": repeats,
                "samples_to_target": r["samples_to_target"], "final_loss": r.get("final_loss"),
                "samples_vs_smallest_batch": (r["samples_to_target"] / ref
                                              if ref and r["samples_to_target"] is not None else None)})
    return out


def write_outputs(results: list[dict], out: Path, target: float, unigram: Optional[float] = None,
                  study: bool = True) -> None:
    """results.csv, summary.json, results.json; for the grid (``study``; not confirm's runs) also
    comparison.md and the plots."""
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "optimizer", "batch", "lr", "lr_multiplier", "step", "samples", "eval_mlm_loss",
                    "eval_mlm_acc", "eval_nsp_acc"])
        for r in results:
            for e in r["evals"]:
                w.writerow([r["name"], r["optimizer"], r["batch"], r["lr"], r["lr_multiplier"], e["step"],
                            e["samples"], e["eval_mlm_loss"], e["eval_mlm_acc"], e["eval_nsp_acc"]])
    summary = [{k: v for k, v in r.items() if k not in ("evals", "gns")} for r in results]
    if unigram is not None:
        for r in summary:
            r["below_unigram"] = unigram - r["final_loss"] if r["final_loss"] == r["final_loss"] else None
    write_json(out / "summary.json", {"target_loss": target, "unigram_entropy": unigram, "runs": summary,
                                      "scaling": scaling_summary(results)})
    write_json(out / "results.json", results, indent=None)  # what plot_grid() needs, for predict's overlay
    if not study:
        return
    prediction = overlay_prediction(results, out, target)
    write_text(out / "comparison.md", comparison_table(results, target, unigram, prediction))
    try:
        from scaling.plots import plot_grid  # here, not at the top: matplotlib is optional
    except ImportError:
        print("scaling: matplotlib is not installed; no plots", file=sys.stderr)
    else:
        plot_grid(results, out, target, prediction=prediction)


def comparison_table(results: list[dict], target: float, unigram: Optional[float] = None,
                     prediction: Optional[dict] = None) -> str:
    """Markdown: per batch, each optimizer's best run over its lr search (by final held-out loss:
    lr multiplier, final loss, steps to the target or the steps it ran without reaching it, the
    spread over the other seeds where repeated, and "edge" when the best lr is the highest or
    lowest tried), and the steps the noise-scale prediction asks for."""
    best = best_per_batch(results)
    fastest = best_per_batch(results, by="target")
    opts = sorted({o for o, _ in best})
    predicted = {b["batch"]: b for b in (prediction or {}).get("batches", [])}
    head = ["batch"] + opts + (["predicted steps (band)"] if prediction else [])
    lines = ["Best run per optimizer and batch over the lr search (lowest final held-out loss"
             + (f"; unigram entropy {unigram:.3f}" if unigram is not None else "") + f"), and its steps to "
             f"held-out loss {target} (fastest run over the search; `>N`: not reached in N steps).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for batch in sorted({b for _, b in best}):
        row = [f"{batch:,}"]
        for opt in opts:
            r = best.get((opt, batch))
            if r is None:
                row.append("")
                continue
            tried = tried_multipliers(results, opt, batch)
            edge = " edge" if len(tried) > 1 and r["lr_multiplier"] in (tried[0], tried[-1]) else ""
            seeds = [final_or_inf(x) for x in results if x["optimizer"] == opt and x["batch"] == batch
                     and x["lr_multiplier"] == r["lr_multiplier"] and x.get("seed_offset", 0)]
            spread = f" (seeds {', '.join(f'{v:.3f}' for v in seeds)})" if seeds else ""
            f = fastest.get((opt, batch))
            if f is not None and f["steps_to_target"] is not None:
                steps = f"{f['steps_to_target']:,.0f} steps"
            else:
                steps = f">{steps_run(r):,} steps"
            row.append(f"×{r['lr_multiplier']:.3g}{edge} of {len(tried)}: {final_or_inf(r):.3f}{spread}, {steps}")
        if prediction:
            p = predicted.get(batch)
            row.append(f"{p['steps']:,.0f} ({min(p['steps_low_noise'], p['steps_high_noise']):,.0f}–"
                       f"{max(p['steps_low_noise'], p['steps_high_noise']):,.0f})" if p else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def overlay_prediction(results: list[dict], out: Path, target: float) -> Optional[dict]:
    """The ``predict`` result kept in one of the study's run dirs, for the same target loss: the
    plot keeps its overlay as runs are added. Of several, the smallest batch's, and there the run
    fastest to the target (the best-tuned lr: a prediction scales its run's own step count)."""
    def key(r):
        steps = r.get("steps_to_target")
        return r["batch"], steps if steps is not None else math.inf, r["name"]

    for r in sorted(results, key=key):
        f = out / r["name"] / "prediction.json"
        if f.is_file():
            try:
                p = json.loads(f.read_text())
            except ValueError:
                continue
            if p.get("target_loss") == target:
                return p
    return None


def print_table(results: list[dict], target: float) -> None:
    print(f"\n{'run':28s} {'lr':>9s} {'steps':>7s} {'final loss':>11s} {'steps to ' + str(target):>14s} {'wall s':>8s}")
    for r in sorted(results, key=lambda r: (r["optimizer"], r["batch"], r["lr_multiplier"])):
        hit = f"{r['steps_to_target']:.0f}" if r["steps_to_target"] is not None else "-"
        flag = " (diverged)" if r.get("diverged") else ("" if r["exit_code"] == 0 else f" (exit {r['exit_code']})")
        print(f"{r['name']:28s} {r['lr']:9.2e} {r['steps']:7d} {r['final_loss']:11.4f} {hit:>14s} "
              f"{r['wall_s']:8.0f}{flag}")
    print(f"\n{'optimizer':10s} {'batch':>6s} {'best lr':>9s} {'steps to target':>16s} {'samples vs smallest batch':>26s}")
    for opt, rows in scaling_summary(results).items():
        for row in rows:
            steps = f"{row['steps_to_target']:.0f}" if row["steps_to_target"] is not None else "not reached"
            rel = f"{row['samples_vs_smallest_batch']:.2f}" if row["samples_vs_smallest_batch"] is not None else "-"
            print(f"{opt:10s} {row['batch']:6d} {row['lr']:9.2e} {steps:>16s} {rel:>26s}")


def edge_specs(args, results: list[dict]) -> list[RunSpec]:
    """One more lr, a factor beyond the edge, for each (optimizer, batch) whose best lr so far is
    the highest or lowest tried (``--extend-edges``): so the best is not at the edge of the search.
    Fully searched optimizers come first (they carry the comparison), then those searched at the
    ends only; larger batches first within each (fewer steps, and the lr rule is least sure there)."""
    if not getattr(args, "extend_edges", False) or not results:
        return []
    mults = sorted(set(args.lr_multipliers))
    if len(mults) < 2:
        return []
    step = mults[-1] / mults[-2]
    out = []
    for (opt, batch), r in best_for_target(results).items():
        tried = tried_multipliers(results, opt, batch)
        if len(tried) < 2 or r["lr_multiplier"] not in (tried[0], tried[-1]):
            continue
        new = tried[-1] * step if r["lr_multiplier"] == tried[-1] else tried[0] / step
        out.append(make_spec(args, opt, batch, new))
    searched = getattr(args, "search_all", [])
    return sorted(out, key=lambda sp: (sp.optimizer not in searched, -sp.batch))


def repeat_specs(args, results: list[dict]) -> list[RunSpec]:
    """More seeds of the best lr at the smallest and largest batch (``--repeat-best``)."""
    if args.repeat_best < 2 or not results:
        return []
    batches = sorted(args.batch_sizes)
    best = best_per_batch(results, by="target")
    final = best_per_batch(results)
    out = []
    for opt in args.search_all:
        for b in (batches[0], batches[-1]):
            r = best.get((opt, b))
            if r is None or r["steps_to_target"] is None:
                r = final.get((opt, b))
            if r is None:
                continue
            for k in range(1, args.repeat_best):
                out.append(make_spec(args, opt, b, r["lr_multiplier"], seed_offset=k))
    return out


def parse_lrs(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(f"--lr wants NAME=LR pairs with NAME in {sorted(OPTIMIZERS)}, got {item!r}")
        out[name] = float(value)
    return out




def comma_list(kind: type) -> Callable[[str], list]:
    """An argparse type: "1,2,3" -> [kind(1), kind(2), kind(3)], empty items dropped."""
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of every command that trains: the runs' settings, their outputs and the targets."""
    ap.add_argument("--config", type=Path, required=True, help="base pretraining config (model, data, precision)")
    ap.add_argument("--data", type=Path, required=True, help="data_prep output for the config's seq len")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--batch-sizes", type=comma_list(int), required=True)
    ap.add_argument("--optimizers", type=comma_list(str), default=["lamb", "lars", "adamw"])
    ap.add_argument("--samples", type=int, required=True, help="training samples per run (same for all)")
    ap.add_argument("--base-batch", type=int, required=True, help="batch size the --lr values are tuned for")
    ap.add_argument("--lr", type=parse_lrs, required=True, help="base lr per optimizer, e.g. lamb=6e-3,adamw=1e-3")
    ap.add_argument("--lr-rule", choices=["sqrt", "linear", "none"], default="sqrt")
    ap.add_argument("--warmup", type=float, default=0.1, help="warmup as a fraction of each run's steps")
    ap.add_argument("--power", type=float, default=0.5, help="polynomial decay power (0: constant after warmup)")
    ap.add_argument("--micro-batch", type=int, default=64, help="largest micro batch per rank (accumulate above)")
    ap.add_argument("--eval-points", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=1024)
    ap.add_argument("--target-loss", type=float, default=4.5, help="held-out MLM loss target")
    ap.add_argument("--train-target", type=comma_list(float), default=[],
                    help="training MLM loss targets (comma-separated), read from each run's training records "
                         "(scaling/targets.py)")
    ap.add_argument("--train-window", type=float, default=TRAIN_WINDOW,
                    help="samples the training MLM loss is smoothed over before --train-target is read")
    ap.add_argument("--np", type=int, default=2, help="processes per run")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (CPU threads shared between them)")
    ap.add_argument("--summarize", action="store_true",
                    help="train nothing: write the outputs from the runs finished so far")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--master-port", type=int, default=29561)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """``python -m scaling grid``: the run flags and the learning-rate search."""
    add_run_arguments(ap)
    ap.add_argument("--lr-multipliers", type=comma_list(float), default=[1.0],
                    help="lr search at the smallest and largest batch, e.g. 0.5,1,2")
    ap.add_argument("--search-all", type=comma_list(str), default=[],
                    help="optimizers whose lr is searched (--lr-multipliers) at every batch, not only at the ends")
    ap.add_argument("--ends-only", type=comma_list(str), default=[],
                    help="optimizers run at the smallest and largest batch only")
    ap.add_argument("--extend-edges", action="store_true",
                    help="after the grid, one more lr beyond the edge wherever the best lr is at an edge "
                         "(--search-all optimizers, then --repeat-best, then the --ends-only ones)")
    ap.add_argument("--repeat-best", type=int, default=1, metavar="N",
                    help="runs per best lr at the smallest and largest batch (N-1 more seeds), for "
                         "the optimizers in --search-all: the noise between runs")


def check(args: argparse.Namespace) -> None:
    """Flags that do not fit together: ValueError, which the command line shows as a usage error."""
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown or any(o not in args.lr for o in args.optimizers):
        raise ValueError(f"optimizers must be among {sorted(OPTIMIZERS)} and each needs a --lr entry")
    for b in args.batch_sizes:
        if b % args.np:
            raise ValueError(f"batch {b} is not divisible by --np {args.np}")
    if args.parallel < 1:
        raise ValueError("--parallel must be at least 1")


def start(args: argparse.Namespace, n_runs: int) -> Optional[float]:
    """Create the output folder and say what will run; the held-out unigram entropy (None where the
    data cannot tell it), which the outputs quote as the plateau to get below."""
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        unigram = unigram_entropy(args.data)
    except (OSError, KeyError, ValueError) as exc:
        print(f"scaling: no unigram entropy ({exc})", file=sys.stderr)
        unigram = None
    if unigram is not None:
        print(f"scaling: held-out unigram entropy {unigram:.4f} nats (the loss of a model that ignores context)",
              flush=True)
    print(f"scaling: {n_runs} runs, {args.samples:,} samples each, {args.parallel} at a time, "
          f"output {args.output}", flush=True)
    return unigram


def run_specs(args: argparse.Namespace, specs: list[RunSpec], indices: Iterable[int], results: dict[int, dict],
              outputs: Callable[[list[dict]], None]) -> list[str]:
    """Run ``specs[i]`` for each of ``indices``, in that order and ``--parallel`` at a time, into
    ``results[i]``, rewriting the outputs after each. With ``--summarize`` nothing trains: the
    finished runs are read back and the names of the others returned."""
    if args.summarize:
        missing = []
        for i in sorted(indices):
            if (args.output / specs[i].name / "result.json").is_file():
                results[i] = run_one(specs[i], args, args.output)  # reads the stored result
            else:
                missing.append(specs[i].name)
        return missing
    lock = threading.Lock()
    free_slots = list(range(args.parallel))

    def work(i: int) -> None:
        spec = specs[i]
        with lock:
            slot = free_slots.pop()
        t = time.time()
        prior = (args.output / spec.name / "result.json").is_file()
        try:
            r = run_one(spec, args, args.output, slot)
        finally:
            with lock:
                free_slots.append(slot)
        status = "done before" if prior else f"{time.time() - t:.0f} s"
        with lock:
            results[i] = r
            print(f"[{len(results)}/{len(specs)}] {spec.name}: {spec.steps} steps of {spec.batch} "
                  f"(micro {spec.micro_batch}), lr {spec.lr:.2e} -> final held-out loss {r['final_loss']:.4f} "
                  f"({status})", flush=True)
            outputs([results[k] for k in sorted(results)])

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(work, i) for i in indices]:
            future.result()
    return []


def finish(args: argparse.Namespace, results: dict[int, dict], outputs: Callable[[list[dict]], None]) -> int:
    """The outputs and the tables from every run; exit status 1 when a run failed (not diverged)."""
    rs = [results[k] for k in sorted(results)]
    outputs(rs)
    print_table(rs, args.target_loss)
    print(json.dumps({"scaling": str(args.output), "runs": len(rs)}))
    return 0 if all(r["exit_code"] in (0, 3) for r in rs) else 1


def run(args: argparse.Namespace) -> int:
    """The grid, then the edge extensions and repeats the finished runs call for."""
    try:
        specs = plan(args)
    except ValueError as exc:
        print(f"scaling grid: {exc}", file=sys.stderr)
        return 2
    unigram = start(args, len(specs))
    results: dict[int, dict] = {}

    def outputs(rs: list[dict]) -> None:
        write_outputs(rs, args.output, args.target_loss, unigram)

    order = range(len(specs)) if args.summarize else \
        sorted(range(len(specs)), key=lambda i: run_priority(specs[i], specs, args.optimizers))
    missing = run_specs(args, specs, order, results, outputs)
    if missing:
        print(f"scaling: {len(missing)} planned runs not finished: {', '.join(missing)}")
    searched = set(args.search_all)

    def edges_searched(a, rs):  # the optimizers compared at every batch: their edges, then their repeats
        return [x for x in edge_specs(a, rs) if x.optimizer in searched]

    def edges_others(a, rs):  # those searched at the ends only come last
        return [x for x in edge_specs(a, rs) if x.optimizer not in searched]

    pending: list[str] = []  # --summarize: extensions and repeats planned from the stored results, not run yet
    for extra_phase in (edges_searched, repeat_specs, edges_others):
        extra = [x for x in extra_phase(args, [results[k] for k in sorted(results)])
                 if x.name not in {sp.name for sp in specs}]
        if not extra:
            continue
        base = len(specs)
        specs += extra
        pending += run_specs(args, specs, range(base, len(specs)), results, outputs)
    if pending:
        print(f"scaling: {len(pending)} edge extensions and repeats not finished: {', '.join(pending)}")
    return finish(args, results, outputs)
