"""Runs gpu_check's stages in the order asked: each prints a table row and one JSON line as it
ends, also appended to OUT/gpu_check.jsonl, so a run cut off at its time limit still reports what
it finished. A stage that raises is reported as failed and the next one runs."""
from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from pathlib import Path

from bench.gpucheck import bare, engine, offload, optim_stages, runs, squad_stage
from bench.gpucheck.common import accelerator, prepare_data, version

# letter -> (stage, seconds its alarm allows beyond --stage-timeout, or None: no alarm, as the
# run.py and finetune launches carry timeouts of their own)
STAGES = {
    "a": (optim_stages.stage_a, 0),
    "b": (optim_stages.stage_b, 0),
    "o": (offload.stage_o, 0),
    "d": (bare.stage_d, 0),
    "e": (engine.stage_e, 120),
    "c": (runs.stage_c, None),
    "f": (engine.stage_f, 120),
    "g": (runs.stage_g, None),
    "s": (squad_stage.stage_s, None),
    "v": (optim_stages.stage_v, 0),
}
DEFAULT_STAGES = "a,b,o,d,e,c"  # the long stage last, so a cut-off run still reports the rest


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
        if not (args.data / "seq128" / "manifest.json").is_file():
            prepare_data(args.out / "prepared")
    state = {"device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    report = Reporter(args.out)
    report("env", None, {"device": state["device_name"], "torch": torch.__version__,
                         "deepspeed": version("deepspeed"), "python": sys.version.split()[0],
                         "triton": version("triton"), "smoke": args.smoke, "model": args.model,
                         "micro": args.micro, "accum": args.accum, "steps": args.steps},
           f"{state['device_name']}, torch {torch.__version__}, triton {version('triton')}")
    failed = False

    def too_long(_signum, _frame):
        raise TimeoutError(f"stage ran past --stage-timeout {args.stage_timeout} s")

    signal.signal(signal.SIGALRM, too_long)
    for s in stages:
        stage, extra = STAGES[s]
        try:
            signal.alarm(0 if extra is None else args.stage_timeout + extra)
            stage(args, report, state)
        except Exception as exc:  # noqa: BLE001 - report the failure and go on to the next stage
            failed = True
            report(s, False, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]},
                   f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            signal.alarm(0)
    if "pipeline_samples_per_s" in state and "bare_samples_per_s" in state:
        ratio = state["pipeline_samples_per_s"] / state["bare_samples_per_s"]
        report("summary", ratio >= 0.9 if args.device != "cpu" else None,
               {"pipeline_over_bare": ratio, **{k: v for k, v in state.items() if k != "device_name"}},
               f"pipeline / bare loop = {ratio:.2f}x (target >= 0.9)")
    return 1 if failed else 0
