"""Runs gpu_check's stages in the order asked: each prints a table row and one JSON line as it
ends, also appended to OUT/gpu_check.jsonl, so a run cut off at its time limit still reports what
it finished. A stage that raises is reported as failed and the next one runs.

Each stage has a time budget (BUDGETS; ``--budget m=200,c=120`` changes them): past it the stage
is cut (its processes killed), reported as failed with ``"cut": true``, and the next one runs.
``--total SECONDS`` bounds the whole call: a stage is cut at what is left of it, and one that
would start with less than MIN_START_S left is reported as not started."""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from bench.gpucheck import bare, efficiency, engine, offload, optim_stages, runs, squad_stage, syncs
from bench.gpucheck.common import accelerator, prepare_data, version

STAGES = {
    "a": optim_stages.stage_a,
    "b": optim_stages.stage_b,
    "o": offload.stage_o,
    "d": bare.stage_d,
    "e": engine.stage_e,
    "c": runs.stage_c,
    "f": engine.stage_f,
    "g": runs.stage_g,
    "s": squad_stage.stage_s,
    "v": optim_stages.stage_v,
    "m": efficiency.stage_m,
    "y": syncs.stage_y,
}
DEFAULT_STAGES = "a,b,o,d,e,c"  # the long stage last, so a cut-off run still reports the rest
# Issue 28's one call of at most 9 minutes on one H100/H200, its stages in order of value
# (--total 530 leaves the call's pip install and start-up inside 9 minutes)
ONE_CALL_STAGES = "m,y,b,c,o,s"
ONE_CALL_TOTAL = 530.0
# Seconds a stage may run before it is cut: "T" = --stage-timeout (90 by default), "T+120" that
# and 120 more (as before budgets); the numbers are sized from docs/gpu's H100 runs with room and
# apply on an accelerator only (--smoke: where --budget or --total sets one; the run.py and
# finetune launches carry timeouts of their own).
BUDGETS = {"a": "T", "b": "T", "o": "T", "d": "T", "v": "T", "e": "T+120", "f": "T+120",
           "c": 330, "g": 330, "s": 300, "m": 300, "y": 120}
MIN_START_S = 15  # a stage is not started with less of --total left


def budgets(args) -> dict[str, float | None]:
    """BUDGETS resolved against --stage-timeout, with --budget's LETTER=SECONDS overrides (None:
    no budget)."""
    out: dict[str, float | None] = {}
    for letter, b in BUDGETS.items():
        if isinstance(b, str):
            out[letter] = float(args.stage_timeout + (int(b.split("+")[1]) if "+" in b else 0))
        else:
            out[letter] = None if args.smoke else float(b)
    for item in filter(None, (getattr(args, "budget", "") or "").split(",")):
        letter, _, secs = item.partition("=")
        out[letter.strip()] = float(secs)
    return out


def parse_budget(text: str) -> str:
    """--budget's value checked: LETTER=SECONDS,... with known letters and positive seconds."""
    for item in filter(None, text.split(",")):
        letter, sep, secs = item.partition("=")
        try:
            ok = bool(sep) and letter.strip() in STAGES and float(secs) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{item!r}: expected LETTER=SECONDS with LETTER among {','.join(STAGES)} and SECONDS > 0")
    return text


class StageCut(Exception):
    """A stage ran past its budget."""


class Reporter:
    """Prints a row per stage (stage, PASS/FAIL/INFO, seconds since the start, figures) and its
    JSON line, and appends that line to OUT/gpu_check.jsonl at once."""

    def __init__(self, out: Path) -> None:
        self.path = out / "gpu_check.jsonl"
        self.t0 = time.perf_counter()
        print(f"{'stage':<10} {'result':<6} {'wall s':>7}  figures", flush=True)

    def __call__(self, stage: str, ok: bool | None, record: dict, summary: str) -> None:
        status = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
        rec = {"stage": stage, "ok": ok, "wall_s": round(time.perf_counter() - self.t0, 1), **record}
        print(f"{stage:<10} {status:<6} {rec['wall_s']:7.1f}  {summary}", flush=True)
        print(json.dumps(rec, default=str), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def run(args, stages: list[str]) -> int:
    """Run ``stages`` (letters of STAGES) with gpu_check's resolved arguments. Returns 0, 1 when
    a stage raised, 2 without an accelerator outside --smoke."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.jsonl").unlink(missing_ok=True)

    import torch

    acc = accelerator()
    args.device = "cpu" if args.smoke else acc.device_name()
    if not args.smoke and args.device == "cpu":
        print("gpu_check: no accelerator found (use --smoke to run the stages on the CPU)", file=sys.stderr)
        return 2
    if args.data is None:
        args.data = args.out / "prepared" / "data"
        if not all((args.data / f"seq{s}" / "manifest.json").is_file() for s in (128, 512)):
            shutil.rmtree(args.out / "prepared", ignore_errors=True)
            prepare_data(args.out / "prepared")
    state = {"device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    report = Reporter(args.out)
    report("env", None, {"device": state["device_name"], "torch": torch.__version__,
                         "deepspeed": version("deepspeed"), "python": sys.version.split()[0],
                         "triton": version("triton"), "smoke": args.smoke, "model": args.model,
                         "micro": args.micro, "accum": args.accum, "steps": args.steps},
           f"{state['device_name']}, torch {torch.__version__}, triton {version('triton')}")
    failed = False
    limits = budgets(args)
    total = getattr(args, "total", None)
    start = time.monotonic()

    def too_long(_signum, _frame):
        raise StageCut()

    signal.signal(signal.SIGALRM, too_long)
    for s in stages:
        cut = limits[s]
        if total is not None:
            left = total - (time.monotonic() - start)
            if left < MIN_START_S:
                failed = True
                report(s, False, {"not_started": True, "left_s": left, "total_s": total},
                       f"not started: {left:.0f} s left of --total {total:.0f}")
                continue
            cut = left if cut is None else min(cut, left)
        args.deadline = None if cut is None else time.monotonic() + cut
        try:
            signal.setitimer(signal.ITIMER_REAL, cut or 0)
            STAGES[s](args, report, state)
        except StageCut:
            failed = True
            report(s, False, {"cut": True, "budget_s": cut}, f"cut: ran past its budget of {cut:.0f} s")
        except Exception as exc:  # noqa: BLE001 - report the failure and go on to the next stage
            failed = True
            report(s, False, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]},
                   f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if "pipeline_samples_per_s" in state and "bare_samples_per_s" in state:
        ratio = state["pipeline_samples_per_s"] / state["bare_samples_per_s"]
        report("summary", ratio >= 0.9 if args.device != "cpu" else None,
               {"pipeline_over_bare": ratio, **{k: v for k, v in state.items() if k != "device_name"}},
               f"pipeline / bare loop = {ratio:.2f}x (target >= 0.9)")
    return 1 if failed else 0
