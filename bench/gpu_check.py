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

``--prepare`` (or ``bench/prepare_offline.py DIR``, the same) builds DeepSpeed's wheel from its
source release (no ops compiled ahead: this project's optimizers need none) and downloads
pure-Python wheels of hjson and pydantic (with pydantic-core for CPython 3.12, manylinux x86-64);
change ``--python-version`` for another interpreter.

The stages live in bench/gpucheck/ (runner.py: their order and report; one module per stage or
group of stages); this file parses the arguments and hands them to the runner.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpucheck import runner  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the stages on the CPU with a tiny model (the default ones: ~2-3 minutes on 2 cores)")
    ap.add_argument("--prepare", type=Path, metavar="DIR", help="build DIR/data and DIR/whl, then exit")
    ap.add_argument("--python-version", default="3.12", help="--prepare: the target interpreter's version")
    ap.add_argument("--data", type=Path, help="a data_prep output holding seq128/ (default: built by --prepare)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--stages", default=runner.DEFAULT_STAGES)
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
    args = ap.parse_args(argv)
    if args.prepare:
        from bench.prepare_offline import prepare

        prepare(args.prepare, args.python_version)
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in runner.STAGES]
    if unknown or not stages:
        ap.error(f"--stages: {', '.join(unknown) or 'none given'}: choose among {','.join(runner.STAGES)}")
    smoke = args.smoke
    args.model = args.model or ("bert-tiny" if smoke else "large")
    args.steps = args.steps or (10 if smoke else 24)
    args.fp16_steps = args.fp16_steps or (10 if smoke else 16)
    args.micro = args.micro or (8 if smoke else 128)
    args.accum = args.accum or 2
    args.rounds = args.rounds or (3 if smoke else 10)
    args.bare_steps = args.bare_steps or (4 if smoke else 10)
    args.resume_rtol = args.resume_rtol if args.resume_rtol is not None else (0.0 if smoke else 1e-3)
    return runner.run(args, stages)


if __name__ == "__main__":
    sys.exit(main())
