"""Stage m: the efficiency table of issue 26. ``pretrain/run.py`` (one process, BERT-Large, the
shipped phase configs: precision "auto" = bf16 on a GPU, ZeRO-2, LAMB nvidia) at phase 1 (seq 128)
and phase 2 (seq 512), each as four variants:

    eager/padded      pretrain.compile "off",     pretrain.packing "off"   (run 5's pipeline)
    compiled/padded   pretrain.compile "layers",  pretrain.packing "off"
    eager/packed      pretrain.compile "off",     pretrain.packing "ffd"
    compiled/packed   pretrain.compile "layers",  pretrain.packing "ffd"

Per variant: samples/s, real tokens/s, ``mfu``, ``hfu``, fill (medians of the records past the
first), peak memory, the first step's time (the first record's interval less its other steps at
the steady rate) and the time from the launch to the first record, and the compiled-graph count
where metrics.jsonl has one. Launches are interleaved: round 1 runs the four variants of phase 1,
then of phase 2; round 2 repeats them (A B C D A' B' C' D' A B C D ...) while the stage's budget
leaves room, so a cut stage still holds a whole round. A run is killed once its last record is
written: the end-of-run checkpoint (4.7 GB at BERT-Large) is not what this stage measures.
Goals: ``mfu`` >= 45% on real tokens at both lengths; real tokens/s at seq 128 >= 1.6x run 5's
116.1k (docs/gpu.md).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.gpucheck.common import REPO
from bench.gpucheck.procs import run_group, tail

GOAL_MFU = 0.45
RUN5_TOKENS_PER_S = 116_100.0  # docs/gpu.md, run 5: one H100, seq 128, eager/padded, real tokens
GOAL_TOKENS_RATIO = 1.6
# phase -> (shipped config, samples per micro-batch as a share of --micro: the same tokens per micro-batch)
PHASES = {128: ("lamb_64k.json", 1), 512: ("lamb_32k.json", 4)}
VARIANTS = (("eager", "padded"), ("compiled", "padded"), ("eager", "packed"), ("compiled", "packed"))
# metrics.jsonl keys that may hold the compiled-graph count (pretrain.compile's, helper H10's work)
COMPILE_KEYS = ("recompiles", "compiled_graphs", "compile_graphs", "graphs_compiled", "compiles")
FIGURES = ("samples_per_s", "tokens_per_s", "mfu", "hfu", "fill", "data_wait")


def phase_config(args, out: Path, seq: int, *, micro: int, steps: int, log_every: int, name: str,
                 **pretrain) -> Path:
    """The shipped phase config (lamb_64k.json at seq 128, lamb_32k.json at 512) cut to a short
    one-GPU run: batch ``micro`` x --accum, ZeRO-2, ``steps`` steps, no held-out evaluation, no
    checkpoint before the end, no TensorBoard; ``pretrain`` keys set on top. Written to
    out/NAME.json."""
    cfg = json.loads((REPO / "ds_configs" / PHASES[seq][0]).read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_comment")}
    cfg["train_batch_size"] = micro * args.accum
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["zero_optimization"] = {"stage": 2}
    block = {k: v for k, v in cfg["pretrain"].items() if k not in ("init_checkpoint", "init_optimizer_state", "output")}
    block.update(model=args.model, max_steps=steps, data=str(args.data / f"seq{seq}"), log_every=log_every,
                 eval_every=0, eval_samples=0, validation_shards=0, checkpoint_every=0, keep_checkpoints=1,
                 tensorboard=False, num_workers=1 if args.device == "cpu" else block.get("num_workers", 4))
    block.update(pretrain)
    cfg["pretrain"] = block
    path = out / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def compile_setting(args) -> tuple[str, str]:
    """(pretrain.compile value of the compiled variants, note for the rows). ``--m-compile``
    (default "layers": each encoder layer compiled); where this checkout's pretrain refuses it,
    the engine-wide compile that exists ("default": inductor; "aot_eager" on the CPU)."""
    from pretrain.model import check_compile

    wanted = args.m_compile
    try:
        check_compile(wanted)
        return wanted, ""
    except ValueError as exc:
        fallback = "aot_eager" if args.device == "cpu" else "default"
        return fallback, f"pretrain.compile {wanted!r} refused here ({str(exc)[:120]}): compiled = {fallback!r}"


def interval_steps(recs: list[dict]) -> list[int]:
    """Steps each record's interval covers."""
    prev, out = 0, []
    for r in recs:
        out.append(r["step"] - prev)
        prev = r["step"]
    return out


def compile_count(rec: dict):
    for k in COMPILE_KEYS:
        if rec.get(k) is not None:
            return rec[k]
    return None


def figures(run_dir: Path) -> dict:
    """A run's figures from its metrics.jsonl: medians of FIGURES over the records past the first
    (warm-up, compilation), peak memory (largest), first step (the first record's interval less
    its other steps at the median steady step time), compiled graphs at the first and last record."""
    from pretrain.metrics import read_records

    recs = [r for r in read_records(run_dir) if "loss" in r]
    if not recs:
        return {}
    out: dict = {"steps_logged": recs[-1]["step"], "records": len(recs)}
    steady = recs[1:]
    for k in FIGURES:
        vals = [r[k] for r in steady if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
    mems = [r["peak_mem_gib"] for r in recs if r.get("peak_mem_gib") is not None]
    out["peak_mem_gib"] = max(mems) if mems else None
    spans = interval_steps(recs)
    per_step = [r["interval_s"] / n for r, n in zip(steady, spans[1:]) if r.get("interval_s") and n]
    if per_step:
        out["step_s"] = statistics.median(per_step)
    if recs[0].get("interval_s") is not None:
        out["first_step_s"] = recs[0]["interval_s"] - (spans[0] - 1) * out.get("step_s", 0.0)
    first, last = compile_count(recs[0]), compile_count(recs[-1])
    out["compiled_graphs"] = last
    out["compiled_after_first_record"] = None if first is None or last is None else last - first
    return out


class FirstRecord:
    """kill_when for a launch: notes when the first record appears, holds once record ``last`` is
    written (the run's measurements are complete; what follows is its end-of-run checkpoint)."""

    def __init__(self, run_dir: Path, last: int) -> None:
        self.path, self.last, self.t0 = run_dir / "metrics.jsonl", last, time.perf_counter()
        self.first_s: float | None = None

    def __call__(self) -> bool:
        if not self.path.is_file():
            return False
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.t0
        from pretrain.metrics import read_records

        return any(r.get("step") == self.last and "loss" in r for r in read_records(self.path.parent))


def launch_run(args, cfg: Path, run_dir: Path, log: Path, steps: int, timeout: float) -> tuple[int | str, float, float | None]:
    """``python pretrain/run.py`` (one process, no launcher), killed once its last record is
    written. Returns (rc: 0, "done" when killed after the last record, else the exit code or -9;
    seconds; seconds to the first record)."""
    cmd = [sys.executable, str(REPO / "pretrain" / "run.py"), "--config", str(cfg), "--output", str(run_dir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "2")
    watch = FirstRecord(run_dir, steps)
    rc, secs = run_group(cmd, log, env, timeout, kill_when=watch)
    if rc == -9 and watch():
        rc = "done"
    return rc, secs, watch.first_s


def phase_sizes(args, seq: int) -> tuple[int, int, int]:
    """(micro-batch, steps, log_every) of a phase-``seq`` run."""
    micro = max(1, args.micro // PHASES[seq][1])
    return micro, args.m_steps, args.m_log_every


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary_row(name: str, f: dict, note: str = "") -> str:
    mem = f.get("peak_mem_gib")
    graphs = f.get("compiled_graphs")
    return (f"{name}: {f.get('samples_per_s', 0):.1f} samples/s, {f.get('tokens_per_s', 0):,.0f} real tok/s, "
            f"MFU {pct(f.get('mfu'))} HFU {pct(f.get('hfu'))}, fill {f.get('fill') or float('nan'):.3f}, "
            f"mem {'n/a' if mem is None else f'{mem:.1f} GiB'}, first step {f.get('first_step_s') or float('nan'):.1f} s "
            f"(first record after {f.get('to_first_record_s') or float('nan'):.0f} s)"
            + ("" if graphs is None else f", graphs {graphs} (+{f.get('compiled_after_first_record')} after the first record)")
            + (f"; {note}" if note else ""))


def combine(rounds: list[dict]) -> dict:
    """One variant's figures over its rounds: medians of the rates, the largest memory, the first
    round's (cold) first step and the last round's (warm caches) beside it."""
    if not rounds:
        return {}
    out = {k: statistics.median([r[k] for r in rounds if r.get(k) is not None])
           for k in FIGURES + ("step_s",) if any(r.get(k) is not None for r in rounds)}
    mems = [r["peak_mem_gib"] for r in rounds if r.get("peak_mem_gib") is not None]
    out["peak_mem_gib"] = max(mems) if mems else None
    for k in ("first_step_s", "to_first_record_s", "compiled_graphs", "compiled_after_first_record"):
        out[k] = rounds[0].get(k)
    out["first_step_s_warm"] = rounds[-1].get("first_step_s") if len(rounds) > 1 else None
    out["rounds"] = len(rounds)
    if len(rounds) > 1 and all(r.get("samples_per_s") for r in rounds):
        rates = [r["samples_per_s"] for r in rounds]
        out["round_spread"] = (max(rates) - min(rates)) / statistics.median(rates)
    return out


def goals(table: dict[int, dict[str, dict]]) -> dict:
    """The goals against the best variant of each phase: mfu >= 45%; seq 128 real tokens/s >= 1.6x
    run 5's."""
    out: dict = {}
    for seq, variants in table.items():
        best = max(((v, f) for v, f in variants.items() if f.get("mfu") is not None),
                   key=lambda vf: vf[1]["mfu"], default=None)
        out[f"best_mfu_{seq}"] = None if best is None else {"variant": best[0], "mfu": best[1]["mfu"]}
    tok = [f["tokens_per_s"] for f in table.get(128, {}).values() if f.get("tokens_per_s")]
    out["best_tokens_per_s_128"] = max(tok, default=None)
    out["tokens_over_run5"] = max(tok) / RUN5_TOKENS_PER_S if tok else None
    reached = [out.get(f"best_mfu_{s}") for s in PHASES]
    out["mfu_goal_met"] = all(r is not None and r["mfu"] >= GOAL_MFU for r in reached)
    out["tokens_goal_met"] = out["tokens_over_run5"] is not None and out["tokens_over_run5"] >= GOAL_TOKENS_RATIO
    return out


def stage_m(args, report, state: dict) -> None:
    out = args.out / "efficiency"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    compiled, note = compile_setting(args)
    phases = [s for s in PHASES if (args.data / f"seq{s}" / "manifest.json").is_file()]
    for seq in PHASES:
        if seq not in phases:
            report(f"m.{seq}", False, {"error": f"no {args.data}/seq{seq}"},
                   f"no seq{seq} data in {args.data}: rebuild it with --prepare (data at seq 128 and 512)")
    deadline = getattr(args, "deadline", None)
    results: dict[tuple[int, str], list[dict]] = {}
    took: dict[tuple[int, str], float] = {}
    for rnd in range(1, args.m_rounds + 1):
        for seq in phases:
            micro, steps, log_every = phase_sizes(args, seq)
            for mode, layout in VARIANTS:
                name = f"{mode}/{layout}"
                tag = f"m.{seq}.{mode}.{layout}.r{rnd}"
                need = took.get((seq, name))
                left = None if deadline is None else deadline - time.monotonic()
                if rnd > 1 and left is not None and need is not None and left < need * 1.2 + 10:
                    report(tag, None, {"skipped": "budget", "left_s": left, "expected_s": need},
                           f"not run: {left:.0f} s left of the stage's budget, round {rnd - 1} took {need:.0f} s")
                    continue
                setting = compiled if mode == "compiled" else "off"
                stem = f"p{seq}_{mode}_{layout}_r{rnd}"
                cfg = phase_config(args, out, seq, micro=micro, steps=steps, log_every=log_every, name=stem,
                                   compile=setting, packing="ffd" if layout == "packed" else "off")
                timeout = args.run_timeout + (120 if mode == "compiled" else 0)
                rc, secs, first = launch_run(args, cfg, out / stem, out / f"{stem}.log", steps, timeout)
                took[(seq, name)] = secs
                f = figures(out / stem)
                f["to_first_record_s"] = first
                ok = rc in (0, "done") and f.get("steps_logged") == steps
                if ok:
                    results.setdefault((seq, name), []).append(f)
                rec = {"seq": seq, "variant": name, "round": rnd, "compile": setting, "packing": layout,
                       "micro": micro, "accum": args.accum, "steps": steps, "rc": rc, "seconds": secs, **f}
                if mode == "compiled" and note:
                    rec["note"] = note
                if not ok:
                    rec["log_tail"] = tail(out / f"{stem}.log")
                report(tag, ok if ok is False else None, rec,
                       summary_row(f"seq {seq} {name} ({setting}) r{rnd}", f,
                                   (f"rc {rc}, {secs:.0f} s" + (f"; {note}" if mode == "compiled" and note else ""))))
    table: dict[int, dict[str, dict]] = {}
    for seq in phases:
        table[seq] = {f"{m}/{lay}": combine(results.get((seq, f"{m}/{lay}"), [])) for m, lay in VARIANTS}
        base = table[seq]["eager/padded"].get("samples_per_s")
        for name, f in table[seq].items():
            f["over_eager_padded"] = f["samples_per_s"] / base if base and f.get("samples_per_s") else None
        report(f"m.{seq}", None, {"seq": seq, "compiled_as": compiled, "variants": table[seq]},
               " | ".join(f"{name} {f.get('samples_per_s', 0):.1f}/s {f.get('over_eager_padded') or float('nan'):.2f}x "
                          f"MFU {pct(f.get('mfu'))}" for name, f in table[seq].items()))
    g = goals(table)
    on_gpu = args.device != "cpu"
    best = {s: g.get(f"best_mfu_{s}") for s in PHASES}
    report("m.goal", (g["mfu_goal_met"] and g["tokens_goal_met"]) if on_gpu else None, g,
           "; ".join(f"seq {s}: best MFU " + ("n/a" if b is None else f"{pct(b['mfu'])} ({b['variant']})")
                     for s, b in best.items())
           + f" (goal {100 * GOAL_MFU:.0f}%); seq 128 {g['best_tokens_per_s_128'] or 0:,.0f} real tok/s = "
             f"{g['tokens_over_run5'] or float('nan'):.2f}x run 5's 116.1k (goal {GOAL_TOKENS_RATIO}x)")
    state["efficiency"] = table
