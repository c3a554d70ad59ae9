"""GPU verification of the main job: optimizer paths, step time, run.py on DeepSpeed, bare loop,
and the efficiency of run.py (packed rows, a compiled model, no host syncs, the field's MFU).

    python bench/gpu_check.py --smoke                  the default stages (a,b,o,d,e,c) on the CPU: ~2-3 minutes on 2 cores
    python bench/gpu_check.py --smoke --stages m,y     the efficiency table and the sync check on the CPU (bert-tiny)
    python bench/gpu_check.py --smoke --stages f,g,s   the others
    python bench/gpu_check.py --data D --out OUT       on one GPU, the default stages: at most ~6 minutes

Issue 28's one call (at most 9 minutes on one H100/H200; the stages in order of value, each cut
at its budget, the call at --total):

    python bench/gpu_check.py --data D --out OUT --one-call     (= --stages m,y,b,c,o,s --total 530)

Expected seconds on an H100 (estimates from docs/gpu's runs 4 and 5, where a run.py launch
spent ~45 s around ~6 s of training, the end-of-run checkpoint included; stage m's launches skip
that checkpoint): m ~300 (its budget: round 1, 8 launches of ~20-25 s start-up + 20 steps, the
compiled ones +30-60 s compiling; round 2 only where the budget leaves room), y ~90 (3 launches),
b ~15, c ~200 (bf16, SIGTERM + --resume, fp16; cut at what --total leaves), o ~20, s ~60. What
--total cuts (c's end, o, s) is the second call's: ``--stages c,o,s --total 200`` on the still
warm machine. docs/gpu.md gives the whole command for the project's device machine.

Stages (``--stages a,b,o,d,e,c``, run in the order given; each prints a table row and one JSON line
as it ends, also appended to OUT/gpu_check.jsonl, so a run cut off at its time limit still
reports what it finished):

(The default order is a, b, o, d, e, c: the long stage last, so a cut-off run still reports the rest.)
Each stage has a time budget on an accelerator (a, b, o, d, v: --stage-timeout; e, f: 120 s more;
c, g 330 s; s 300; m 300; y 120; ``--budget m=200,c=150`` changes them): a stage past it is cut,
its processes killed, and reported as failed with "cut": true; the next one runs.

a. LAMB (paper, nvidia, deepspeed) and LARS: ``impl="loop"`` against ``"foreach"`` against the
   default GPU path (``impl=None``), 20 fp32 steps on a random problem with the learning rate
   changing every step: largest relative difference of the weights (target <= 1e-6); the same in
   bf16 against the fp32 loop (bf16 tolerance); how many kernel variants or graphs the default
   path compiled after step 2 and after step 20 (must not grow as lr and step change).
b. Step time on BERT-Large shapes (336M parameters), interleaved rounds, median:
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
m. (not in the default stages; first in the one call) the efficiency table of issue 26:
   ``pretrain/run.py`` (one process), BERT-Large, the shipped phase configs (precision "auto" =
   bf16, LAMB nvidia) at ZeRO-2, phase 1 (seq 128, --micro x --accum) and phase 2 (seq 512,
   --micro/4 x --accum), each eager/padded, compiled/padded, eager/packed, compiled/packed
   (``pretrain.compile`` --m-compile, default "layers"; ``pretrain.packing`` "ffd"), --m-steps
   steps logged every --m-log-every: samples/s, real tokens/s, mfu, hfu, fill, peak memory, first
   step time, compiled graphs; launches interleaved by rounds (phase 1's four, phase 2's four,
   again while the budget lasts), each launch's line written as it ends, then a line per phase
   and the goals: mfu >= 45% at both lengths, real tokens/s at seq 128 >= 1.6x run 5's 116.1k.
y. (not in the default stages) no host sync inside a step: run.py's loop (bench/gpucheck/
   sync_worker.py) under ``torch.cuda.set_sync_debug_mode("error")`` from step 3 on, outside the
   log, evaluation, checkpoint and stop code, with padded rows (compile at its default) and
   packed rows; on the CPU a recording dispatch mode stands in. And the noise scale's cost: a run
   logging every step, measuring at every other one: the measuring step's extra time as a share
   of a step at gns_every 10 (goal <= 3%).
v. (not in the default stages) the default GPU LAMB step's Triton kernels in five layouts
   (masked or even splits, compiler hints, 4/8/16 warps) on BERT-Large shapes, and the loader's
   samples/s with 1, 2, 4 and 8 DataLoader workers: what stage b's ratio and stage c's data wait
   are made of.

Repeating the GPU run on a machine with PyTorch, transformers and tokenizers but no internet (as
the project's device machine; commands from the repository root):

    # here, with internet and the project's venv:
    python bench/gpu_check.py --prepare .gpu      # .gpu/data (embedded corpus, 30,522 vocab, seq 128 and 512)
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


def _budget(text: str) -> str:
    try:
        return runner.parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the stages on the CPU with a tiny model (the default ones: ~2-3 minutes on 2 cores)")
    ap.add_argument("--prepare", type=Path, metavar="DIR", help="build DIR/data and DIR/whl, then exit")
    ap.add_argument("--python-version", default="3.12", help="--prepare: the target interpreter's version")
    ap.add_argument("--data", type=Path, help="a data_prep output holding seq128/ (default: built by --prepare)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--stages", default=runner.DEFAULT_STAGES)
    ap.add_argument("--one-call", action="store_true",
                    help=f"issue 28's 9-minute call: --stages {runner.ONE_CALL_STAGES} --total {runner.ONE_CALL_TOTAL:.0f} "
                         "(--total may still be given)")
    ap.add_argument("--model", default=None, help="preset for stages b-d (default large; bert-tiny with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of the bf16 runs (default 24)")
    ap.add_argument("--fp16-steps", type=int, default=None, help="optimizer steps of the fp16 run (default 16)")
    ap.add_argument("--stage-timeout", type=int, default=90, help="budget in seconds of stages a, b, o, d, v (e, f: 120 more)")
    ap.add_argument("--budget", default="", type=_budget, metavar="L=S,...",
                    help="stage budgets in seconds, e.g. m=200,c=150 (on --smoke only these and the --stage-timeout ones)")
    ap.add_argument("--total", type=float, default=None, metavar="S",
                    help="seconds for the whole call: each stage cut at what is left, none started with under 15 s")
    ap.add_argument("--m-steps", type=int, default=None, help="stage m: steps per launch (default 20; 6 with --smoke)")
    ap.add_argument("--m-log-every", type=int, default=None, help="stage m: steps per record (default 4; 2 with --smoke)")
    ap.add_argument("--m-rounds", type=int, default=None, help="stage m: rounds of launches while the budget lasts (default 2; 1 with --smoke)")
    ap.add_argument("--m-compile", default="layers", help="stage m: pretrain.compile of the compiled variants")
    ap.add_argument("--y-steps", type=int, default=None, help="stage y: steps of each sync-check run (default 10; 6 with --smoke)")
    ap.add_argument("--y-gns-steps", type=int, default=None, help="stage y: steps of the noise-scale run (default 18; 8 with --smoke)")
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
    if args.one_call:
        args.stages = runner.ONE_CALL_STAGES
        args.total = args.total if args.total is not None else runner.ONE_CALL_TOTAL
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
    args.m_steps = args.m_steps or (6 if smoke else 20)
    args.m_log_every = args.m_log_every or (2 if smoke else 4)
    args.m_rounds = args.m_rounds or (1 if smoke else 2)
    args.y_steps = args.y_steps or (6 if smoke else 10)
    args.y_gns_steps = args.y_gns_steps or (8 if smoke else 18)
    args.resume_rtol = args.resume_rtol if args.resume_rtol is not None else (0.0 if smoke else 1e-3)
    return runner.run(args, stages)


if __name__ == "__main__":
    sys.exit(main())
