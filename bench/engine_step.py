"""Where the pipeline's step time goes: one model, batch and precision, batches in memory.

    python bench/engine_step.py --data .gpu/data --model large --micro 128 --accum 2 --out OUT
    python bench/engine_step.py --smoke          # CPU, bert-tiny, fp32: checks the script, times nothing useful

On an H100 (``bench/gpu_check.py``, 2026-11-27) run.py reached 0.66x the samples/s of a bare
PyTorch loop on the same model and batch with DeepSpeed's bf16 gradient scan on (run 4) and
0.95x with it off, as the shipped configs set it (run 5; target 0.9x). The two differ in several things at
once; this script separates them, each mode timed in interleaved rounds (A B C D A B C D ...)
in one process, batches already on the device:

  bare      fp32 weights, autocast bf16 (GPU) / fp32 (CPU), our LAMB (``optim.Lamb``) -- stage d
  zero0     a DeepSpeed engine (``optim.initialize``, the shipped GPU config's optimizer):
            bf16 weights with fp32 masters (GPU), ZeRO stage 0
  zero1     the same at ZeRO stage 1 (the shipped ``lamb_64k.json``)
  zero2     the same at ZeRO stage 2 (gpu_check stage c)

An engine mode may carry DeepSpeed config overrides, timed beside it: ``zero2+bf16.check_grad_overflow=true``
(dotted keys, JSON values; bf16 ``zero0`` runs DeepSpeed's unfused mixed-precision wrapper, which
always scans for overflow). On the H100 (2026-11-27) DeepSpeed's bf16 gradient scan, on by default and
off in the shipped configs, was the largest engine cost: ZeRO-2 692.9 samples/s with it, 855.1
without, bare loop 1,111.9 (record: docs/gpu/run4_metrics/engine_step_variants.json).

then ``torch.profiler`` over one step of each mode in ``--profile`` (default ``bare`` and ``zero2``): the device time by kernel
(top kernels), host time, and a Chrome trace of each in OUT. zero2 against run.py's figure
(gpu_check stage c) is what the loop and the data path cost; bare against zero0/1/2 what the
engine costs. Prints a table and one JSON line (``ENGINE_STEP {...}``).

With ``--compile [BACKEND]`` (``pretrain.compile``'s values; default: the accelerator's backend),
afterwards: the ZeRO-2 engine with its model compiled, the compilation's time, and rounds
alternating with the eager ZeRO-2 engine (``ENGINE_COMPILE {...}``, a line of its own so that a
slow compilation cannot take the eager figures with it).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gpucheck.common import Bare, batches, prepare_data  # noqa: E402  (stage d's bare loop)


MODES = ("bare", "zero0", "zero1", "zero2")


def parse_mode(mode: str) -> tuple[str, dict]:
    """``zero2+bf16.check_grad_overflow=false`` -> ("zero2", {"bf16.check_grad_overflow": False}):
    a mode, then DeepSpeed config overrides (dotted keys, JSON values) to time beside it."""
    base, *sets = re.split(r"\+(?=[A-Za-z_][\w.]*=)", mode)  # a '+' inside a value (5e+8) stays
    head, plus, rest = base.partition("+")
    if plus and head in MODES:
        raise ValueError(f"--modes: {mode!r}: override {rest!r} is not key=value")
    if base not in MODES or (base == "bare" and sets):
        raise ValueError(f"--modes: {mode!r}: a mode is one of {', '.join(MODES)}, an engine mode "
                         f"optionally followed by +dotted.key=json_value overrides")
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--modes: {mode!r}: override {item!r} is not key=value")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--modes: {mode!r}: {value!r} is not a JSON value") from None
    return base, overrides


def trace_name(index: int, mode: str) -> str:
    """``trace_zero2.json``; a mode with overrides by its position: ``trace_3_zero2.json``."""
    return f"trace_{mode}.json" if "+" not in mode else f"trace_{index}_{mode.split('+')[0]}.json"


def engine_config(mode: str, micro: int, accum: int, bf16: bool) -> dict:
    base, overrides = parse_mode(mode)
    cfg = json.loads((REPO / "ds_configs" / "lamb_64k.json").read_text())
    shipped_bf16 = cfg.get("bf16") or {}  # its other keys (check_grad_overflow) as shipped
    for key in ("_comment", "pretrain", "scheduler", "fp16", "bf16"):
        cfg.pop(key, None)
    cfg.update(train_batch_size=micro * accum, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=accum, zero_optimization={"stage": int(base[-1])},
               steps_per_print=10**9, bf16={**shipped_bf16, "enabled": bf16})
    cfg["optimizer"]["params"]["lr"] = 1e-4
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--modes: {mode!r}: {part} in {key} is not an object in the config")
        node[leaf] = value
    return cfg


class Engine:
    def __init__(self, model, cfg: dict) -> None:
        import optim

        self.engine, *_ = optim.initialize(model=model, config=cfg)

    def step(self, micro_batches: list[dict]) -> None:
        for b in micro_batches:
            out = self.engine(**b)
            self.engine.backward(out.loss)
            self.engine.step()


def profile(runner, micro_batches, device, trace: Path, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acc = __import__("deepspeed").accelerator.get_accelerator()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    acc.synchronize()
    t = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        runner.step(micro_batches)
        acc.synchronize()
    wall = time.perf_counter() - t
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def dev_us(e):
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) if on_device \
            else e.self_cpu_time_total

    if on_device:  # the kernels themselves: an operator's device time is its kernels' again
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    rows = sorted(events, key=dev_us, reverse=True)[:top]
    return {"wall_ms": wall * 1e3,
            # kernel time summed; above the wall time only where streams overlap
            "device_busy_ms": sum(dev_us(e) for e in events) / 1e3 if on_device else None,
            "top": [{"name": e.key[:90], "calls": e.count, "ms": dev_us(e) / 1e3} for e in rows],
            "trace": str(trace)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--data", type=Path, help="a data_prep output holding seq128/")
    ap.add_argument("--model", default=None)
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds of every mode (after one warm-up)")
    ap.add_argument("--modes", default="bare,zero0,zero1,zero2",
                    help="comma-separated; an engine mode may carry config overrides, "
                         "e.g. zero2+bf16.check_grad_overflow=false")
    ap.add_argument("--profile", default="bare,zero2", help="modes profiled for one step each")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per profile")
    ap.add_argument("--out", type=Path, default=Path("engine_step_out"))
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="BACKEND",
                    help="also time the ZeRO-2 engine with its model compiled (pretrain.compile's values)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiles")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        ap.error(f"--modes: choose among {', '.join(MODES)}, got {args.modes!r}")
    try:
        for m in modes:
            parse_mode(m)
    except ValueError as exc:
        ap.error(str(exc))
    profiled = [] if args.no_profile else [m.strip() for m in args.profile.split(",") if m.strip()]
    if set(profiled) - set(modes):
        ap.error(f"--profile: {sorted(set(profiled) - set(modes))} not among --modes")
    if args.compile and "zero2" not in modes:
        ap.error("--compile compares against the zero2 mode: include it in --modes")
    if args.compile:
        from pretrain.model import check_compile

        try:
            check_compile(args.compile)
        except ValueError as exc:
            ap.error(str(exc))
    args.modes, args.profiled = modes, profiled
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    modes, profiled = args.modes, args.profiled
    args.model = args.model or ("bert-tiny" if args.smoke else "large")
    args.micro = args.micro or (8 if args.smoke else 128)
    args.rounds = args.rounds or (2 if args.smoke else 5)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = args.out / "prepared" / "data"
        if not (args.data / "seq128" / "manifest.json").is_file():
            prepare_data(args.out / "prepared")

    import torch

    from data_prep.atomic import write_json
    from pretrain.distributed import init_distributed
    from pretrain.model import build_model

    init_distributed()
    acc = __import__("deepspeed").accelerator.get_accelerator()
    device = torch.device(acc.device_name(acc.current_device()) if acc.device_name() != "cpu" else "cpu")
    bf16 = device.type != "cpu"  # this CPU emulates bf16 (~14x slower): fp32 there
    vocab = json.loads((args.data / "seq128" / "manifest.json").read_text())["vocab"]["size"]
    data = batches(args.data, args.micro, args.accum * 2, device)
    runners = {}
    for m in modes:
        model = build_model(args.model, vocab, seed=0)
        runners[m] = Bare(model, device, bf16) if m == "bare" else \
            Engine(model, engine_config(m, args.micro, args.accum, bf16))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):  # round 0: warm-up (kernel choice, allocator, first-step work)
        for m in modes:
            acc.synchronize()
            t = time.perf_counter()
            runners[m].step(data[(r % 2) * args.accum:(r % 2 + 1) * args.accum])
            acc.synchronize()
            if r:
                times[m].append(time.perf_counter() - t)
    glob = args.micro * args.accum
    rate = {m: glob / statistics.median(v) for m, v in times.items()}
    mem = acc.max_memory_allocated() / 2**30 if device.type != "cpu" else None
    profiles = {m: profile(runners[m], data[:args.accum], device, args.out / trace_name(i, m), args.top)
                for i, m in enumerate(modes) if m in profiled}
    ref = rate.get("bare")
    width = max(7, *map(len, modes))
    print(f"{'mode':<{width}} {'samples/s':>10} {'x bare':>7}  (median of {args.rounds} interleaved rounds, "
          f"batch {glob} = {args.micro} x {args.accum}, {args.model}, {'bf16' if bf16 else 'fp32'}, {device.type})")
    for m in modes:
        print(f"{m:<{width}} {rate[m]:>10.1f} {rate[m] / ref if ref else float('nan'):>7.2f}")
    for m, p in profiles.items():
        busy = f", device busy {p['device_busy_ms']:.1f} ms" if p["device_busy_ms"] is not None else ""
        print(f"profile {m}: one step {p['wall_ms']:.1f} ms wall{busy}; top: "
              + "; ".join(f"{x['name'][:40]} {x['ms']:.2f} ms x{x['calls']}" for x in p["top"][:6]))
    record = {"model": args.model, "micro": args.micro, "accum": args.accum, "precision": "bf16" if bf16 else "fp32",
              "device": device.type, "samples_per_s": rate, "over_bare": {m: rate[m] / ref for m in rate} if ref else None,
              "rounds": args.rounds, "peak_mem_gib": mem, "profiles": profiles}
    write_json(args.out / "engine_step.json", record)
    print("ENGINE_STEP " + json.dumps(record), flush=True)
    if args.compile:
        compiled = compare_compiled(args, runners["zero2"], data, vocab, bf16, acc)
        record["compiled"] = compiled
        write_json(args.out / "engine_step.json", record)
        print(f"zero2 compiled ({args.compile}): {compiled['samples_per_s']['zero2c']:.1f} samples/s against "
              f"{compiled['samples_per_s']['zero2']:.1f} eager = {compiled['speedup']:.2f}x; first step "
              f"(compilation) {compiled['first_step_s']:.1f} s")
        print("ENGINE_COMPILE " + json.dumps(compiled), flush=True)
    return 0


def compare_compiled(args, eager: Engine, data: list, vocab: int, bf16: bool, acc) -> dict:
    """The ZeRO-2 engine compiled as ``pretrain.compile`` does, rounds alternating with ``eager``."""
    from pretrain.model import build_model, compile_engine

    runner = Engine(build_model(args.model, vocab, seed=0), engine_config("zero2", args.micro, args.accum, bf16))
    compile_engine(runner.engine, args.compile)
    acc.synchronize()
    t = time.perf_counter()
    runner.step(data[:args.accum])  # compiles
    acc.synchronize()
    first = time.perf_counter() - t
    times: dict[str, list[float]] = {"zero2": [], "zero2c": []}
    for r in range(args.rounds):
        for name, run in (("zero2", eager), ("zero2c", runner)):
            acc.synchronize()
            t = time.perf_counter()
            run.step(data[(r % 2) * args.accum:(r % 2 + 1) * args.accum])
            acc.synchronize()
            times[name].append(time.perf_counter() - t)
    glob = args.micro * args.accum
    rate = {k: glob / statistics.median(v) for k, v in times.items()}
    return {"backend": args.compile, "samples_per_s": rate, "speedup": rate["zero2c"] / rate["zero2"],
            "first_step_s": first, "rounds": args.rounds}


if __name__ == "__main__":
    sys.exit(main())
