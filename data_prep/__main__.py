"""Command line: python -m data_prep {vocab,build,inspect,embedded-corpus} ..."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from .atomic import write_json
from .readers import FORMATS, DataPrepError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Corpus preprocessing for BERT pretraining: raw text -> balanced, memory-mapped shards.",
        epilog="typical use:\n"
               "  python -m data_prep vocab --input wiki/ books/ --output vocab/ --vocab-size 30522\n"
               "  python -m data_prep build --input wiki/ books/ --vocab vocab/ --output data/ --seq-lens 128,512\n"
               "  python -m data_prep inspect data/seq128\n"
               "then train on data/seq128 and data/seq512 (format: data_prep/FORMAT.md)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    v = sub.add_parser("vocab", formatter_class=fmt, help="train a WordPiece vocab, or check an existing one",
                       description="Train a BERT WordPiece vocabulary with `tokenizers` and write a directory "
                                   "that transformers.BertTokenizerFast.from_pretrained loads; or, with --check, "
                                   "load and validate an existing vocab.txt or tokenizer directory.")
    v.add_argument("--input", nargs="+", metavar="PATH", help="files, globs or directories (any supported format)")
    v.add_argument("--output", metavar="VOCAB_DIR", help="directory to write vocab.txt and tokenizer files to")
    v.add_argument("--check", metavar="VOCAB", help="validate this vocab.txt or tokenizer directory and exit")
    v.add_argument("--vocab-size", type=int, default=30522, help="number of tokens, special tokens included")
    v.add_argument("--cased", action="store_true", help="keep case and accents (default: lower-case, as BERT uncased)")
    v.add_argument("--min-frequency", type=int, default=2, help="minimum count for a merged word piece")
    v.add_argument("--max-chars", type=int, default=None,
                   help="train on at most this many characters of input (a sample is enough for a vocab)")
    v.add_argument("--format", default="auto", choices=FORMATS, help="input format (auto: detect per file)")
    v.add_argument("--text-key", default="text", help="field/column holding the text for jsonl and hf inputs")
    v.add_argument("--overwrite", action="store_true", help="replace a vocab trained on other inputs or options")

    b = sub.add_parser("build", formatter_class=fmt, help="preprocess a corpus into pretraining shards",
                       description="Tokenize the inputs once and write OUT/seq<L>/ for every --seq-lens value: "
                                   "balanced shards of BERT samples plus manifest.json. Resumable: rerun the same "
                                   "command after a crash or Ctrl-C and finished work is kept.")
    b.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, globs or directories; several at once (e.g. wiki + books)")
    b.add_argument("--vocab", required=True, metavar="VOCAB", help="vocab.txt or a tokenizer directory")
    b.add_argument("--output", required=True, metavar="OUT", help="output directory")
    b.add_argument("--seq-lens", type=_ints, default=(128, 512), help="sequence lengths, comma-separated; one "
                   "tokenization serves all")
    b.add_argument("--shards", type=int, default=64, help="shards per seq len; each holds the same number of "
                   "samples +-1 (ranks read equal slices of all samples, whatever the count)")
    b.add_argument("--heldout-shards", type=int, default=1,
                   help="the last N shards hold a held-out set split by document: those documents (N/shards of "
                        "all, drawn at random) feed no training sample, not even as a random next segment "
                        "(0: no held-out set)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (output does not "
                   "depend on it)")
    b.add_argument("--seed", type=int, default=12345, help="seed of every random choice")
    b.add_argument("--masking", choices=("static", "dynamic"), default="dynamic",
                   help="static: masks drawn now and stored; dynamic: unmasked tokens stored, masks drawn at "
                        "load time per (seed, epoch, index)")
    b.add_argument("--dupe-factor", type=int, default=None, help="passes over the corpus with different random "
                   "pairs (and masks); default 5 for static masking, 1 for dynamic")
    b.add_argument("--pair-task", choices=("nsp", "sop"), default="nsp",
                   help="nsp: B is the real next text or (50%%) text from another document; sop: A and B "
                        "consecutive, swapped 50%% of the time")
    b.add_argument("--whole-word-mask", action="store_true", help="mask all pieces of a word together")
    b.add_argument("--mask-prob", type=float, default=0.15, help="fraction of tokens to predict")
    b.add_argument("--max-predictions", type=_ints, default=None,
                   help="max masked positions per sample, one per seq len (default 20 at 128, 80 at 512, "
                        "else ceil(mask_prob*L))")
    b.add_argument("--short-seq-prob", type=float, default=0.1, help="probability of a shorter target length")
    b.add_argument("--format", default="auto", choices=FORMATS, help="input format (auto: detect per file)")
    b.add_argument("--text-key", default="text", help="field/column holding the text for jsonl and hf inputs")
    b.add_argument("--min-doc-chars", type=int, default=None,
                   help="drop documents shorter than this (default: 200 for WikiExtractor stubs, else 0)")
    b.add_argument("--max-line-chars", type=int, default=1_000_000,
                   help="longer lines of text inputs are read in pieces (bounds memory)")
    b.add_argument("--cased", action="store_true", default=None,
                   help="force cased tokenization (default: from the vocab's tokenizer_config.json)")
    b.add_argument("--keep-work", action="store_true", help="keep OUT/.work (tokenized corpus) after success")
    b.add_argument("--overwrite", action="store_true", help="replace an existing build with other options")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", formatter_class=fmt, help="print a manifest summary and decoded samples",
                       description="Decode samples of a build output (e.g. OUT/seq128) as training sees them.")
    i.add_argument("data", metavar="DIR", help="a build output for one seq len")
    i.add_argument("--samples", type=int, default=2, help="how many samples to print")
    i.add_argument("--epoch", type=int, default=0, help="epoch whose dynamic masks to show")

    e = sub.add_parser("embedded-corpus", formatter_class=fmt,
                       help="write an English corpus from the Python standard library's documentation",
                       description="Write OUT_DIR/stdlib_docs.txt in the plain-text format from "
                                   "pydoc_data.topics and standard-library docstrings (no download).")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.add_argument("--max-bytes", type=int, default=4_000_000, help="size cap of the corpus")
    return p


def _vocab(a) -> int:
    from .vocab import describe, load_vocab, train_vocab

    if a.check:
        print(describe(load_vocab(a.check)))
        return 0
    if not a.input or not a.output:
        raise DataPrepError("vocab: give --input and --output to train, or --check VOCAB to validate")
    from .readers import ReadStats, discover, iter_documents

    units, skipped = discover(a.input, a.format, exclude=a.output)
    for s in skipped:
        print(f"data_prep: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if not units:
        raise DataPrepError("vocab: no usable input files")
    # A rerun with the same inputs and options keeps the existing vocab instead of training again
    # (the same vocab.txt, byte for byte, but that takes minutes on a large corpus).
    stamp = {"inputs": [[u.label(), _fingerprint(u.path)] for u in units], "vocab_size": a.vocab_size,
             "cased": a.cased, "min_frequency": a.min_frequency, "max_chars": a.max_chars, "format": a.format,
             "text_key": a.text_key}
    stamp_file = Path(a.output) / "data_prep_vocab.json"
    if (Path(a.output) / "vocab.txt").is_file():
        old = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
        if old == stamp:
            print(f"data_prep: {a.output} already holds a vocab trained on these inputs; nothing to do",
                  file=sys.stderr)
            print(describe(load_vocab(a.output)))
            return 0
        if not a.overwrite:
            raise DataPrepError(f"{a.output} already holds a vocab trained on other inputs or options; "
                                f"choose a new --output or pass --overwrite")
    budget = [a.max_chars if a.max_chars else float("inf")]

    problems: dict[str, dict] = {}

    def texts():
        for u in units:
            stats = ReadStats()
            try:
                for doc in iter_documents(u, stats, text_key=a.text_key):
                    for para in doc:
                        if budget[0] <= 0:
                            return
                        budget[0] -= len(para)
                        yield para
            finally:
                found = {k: getattr(stats, k) for k in ("invalid_utf8", "long_lines", "bad_records")
                         if getattr(stats, k)}
                if found or stats.messages:
                    problems[u.label()] = {**found, "messages": stats.messages[:3]}

    v = train_vocab(texts(), a.output, vocab_size=a.vocab_size, lowercase=not a.cased, min_frequency=a.min_frequency)
    for label, found in problems.items():  # what build would report, per file
        counts = ", ".join(f"{k}={n}" for k, n in found.items() if k != "messages")
        print(f"data_prep: input problems in {label}: {counts or '; '.join(found['messages'])}", file=sys.stderr)
    if v.size > a.vocab_size:
        print(f"data_prep: vocab has {v.size:,} tokens, more than --vocab-size {a.vocab_size:,}: WordPiece keeps "
              f"every character of the corpus's alphabet (up to 1,000) as a token besides the word pieces, "
              "so a size below the alphabet's gives no whole-word tokens; raise --vocab-size", file=sys.stderr)
    write_json(stamp_file, stamp)
    print(describe(v))
    return 0


def _fingerprint(path: str) -> str:
    """Size plus a hash of the first and last MiB: notices changed inputs without reading GBs."""
    p = Path(path)
    if p.is_dir():  # a datasets directory: its state file names the arrow files and their fingerprint
        p = p / "state.json" if (p / "state.json").is_file() else p / "dataset_dict.json"
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:24]


def _build(a) -> int:
    from .pipeline import build
    from .config import BuildConfig

    cfg = BuildConfig(inputs=a.input, vocab=a.vocab, output=a.output, seq_lens=a.seq_lens, shards=a.shards,
                      heldout_shards=a.heldout_shards,
                      workers=a.workers, seed=a.seed, masking=a.masking, dupe_factor=a.dupe_factor,
                      pair_task=a.pair_task, whole_word_mask=a.whole_word_mask, fmt=a.format,
                      short_seq_prob=a.short_seq_prob, mask_prob=a.mask_prob, max_predictions=a.max_predictions,
                      min_doc_chars=a.min_doc_chars, max_line_chars=a.max_line_chars, text_key=a.text_key,
                      lowercase=False if a.cased else None, keep_work=a.keep_work, overwrite=a.overwrite,
                      progress=not a.no_progress)
    build(cfg)
    return 0


def _inspect(a) -> int:
    from transformers import BertTokenizerFast

    from .dataset import PretrainingDataset

    ds = PretrainingDataset(a.data, epoch=a.epoch)
    m = ds.manifest
    print(json.dumps({k: m[k] for k in ("seq_len", "num_samples", "num_tokens", "masking", "pair_task",
                                         "pair_labels", "max_predictions_per_seq", "num_shards")}))
    tok = BertTokenizerFast.from_pretrained(str((ds.path / m["vocab"]["path"]).resolve()))
    for idx in range(min(a.samples, len(ds))):
        item = ds[idx]
        n = int(item["attention_mask"].sum())
        ids = item["input_ids"][:n].tolist()
        words = tok.convert_ids_to_tokens(ids)
        pos = item["masked_lm_positions"][item["masked_lm_labels"] >= 0].tolist()
        labels = tok.convert_ids_to_tokens(item["masked_lm_labels"][item["masked_lm_labels"] >= 0].tolist())
        print(f"\n--- sample {idx}: {n} tokens, next_sentence_label={int(item['next_sentence_label'])}")
        print(" ".join(words))
        print("masked: " + ", ".join(f"{p}:{w}->{lab}" for p, w, lab in zip(pos, (words[p] for p in pos), labels)))
    return 0


def _embedded(a) -> int:
    from .embedded import write_corpus

    path = write_corpus(a.out_dir, a.max_bytes)
    print(f"data_prep: wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def _stop(signum, frame):
    raise KeyboardInterrupt  # a scheduler's SIGTERM stops the build like Ctrl-C: cleanly, resumable


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    try:
        return {"vocab": _vocab, "build": _build, "inspect": _inspect, "embedded-corpus": _embedded}[a.cmd](a)
    except DataPrepError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only output disk, a path that is a file: name it
        out = getattr(a, "output", None) or getattr(a, "out_dir", None)
        where = e.filename or (f"output {out}" if out else "")
        print(f"data_prep: error: {where}: {e.strerror or e}" if where else f"data_prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("data_prep: stopped (Ctrl-C or SIGTERM)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
