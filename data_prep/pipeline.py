"""The build: tokenize every input once, pair and mask per seq len, write balanced shards.

Three passes, each resumable because every finished piece is renamed into place atomically:
  1. tokenize  - per input unit (file or row range), in a worker pool: documents -> sentences
                 (blingfire) -> WordPiece ids (tokenizers). Output: .work/tok/<hash>/
  2. pair      - per unit and seq len, in the pool: BERT sample pairs (+ static masks). Random
                 "next" segments come from any unit's tokens (memory-mapped), so the result does
                 not depend on how units were spread over workers. Output: .work/seq<L>/<hash>/
  3. shard     - one streaming pass per seq len: global sample i goes to shard i mod K, so shards
                 differ by at most one sample and each is a stride through the whole corpus.
Every random choice comes from an RNG seeded by (seed, seq len, dupe, unit index), never by worker.

Memory bound (anonymous memory; memory-mapped inputs add reclaimable page cache on top): each
worker holds one document (cut at max_doc_chars, 4M characters), up to 8,192 sentences waiting for
one encode call and a ~4M-token write buffer; the parent holds one merge group (~8M tokens) while
writing shards. None of it grows with the corpus. One input file is one unit of work, so a single
huge file is tokenized by one worker (split big JSONL/text files to use all cores).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import json
import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic, shardio
from .config import BuildConfig
from .readers import DataPrepError, ReadStats, Unit, discover, iter_documents
from .samples import MaskSpec, PairOptions, default_max_predictions, document_pairs, mask_sample
from .vocab import Vocab, load_vocab, save_dir

FORMAT_VERSION = "data_prep/1"
_ENCODE_CHARS = 1 << 18  # characters per encode call (a batch of ~60k tokens)
_FLUSH_TOKENS = 1 << 22  # buffer ~4M tokens per worker before appending to disk
_MERGE_GROUP_TOKENS = 1 << 23  # tokens gathered per merge step before writing to the K shards
_MERGE_BLOCK_SAMPLES = 1 << 16  # a big unit is merged in blocks of samples, so memory stays bounded


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


class _Appender:
    """Raw per-array files in a temp directory, renamed into place when complete."""

    def __init__(self, final: Path, dtypes: dict[str, np.dtype]):
        self.final = final
        self.tmp = atomic.temp_path(final)
        atomic.discard(self.tmp)
        self.tmp.mkdir(parents=True)
        self.dtypes = dtypes
        self.buf: dict[str, list] = {k: [] for k in dtypes}
        self.files = {k: open(self.tmp / f"{k}.bin", "wb") for k in dtypes}

    def add(self, name: str, arr) -> None:
        self.buf[name].append(np.asarray(arr, dtype=self.dtypes[name]))

    def add_scalars(self, **values: int) -> None:
        """One value per array; kept as Python ints until flush (an ndarray each would cost more)."""
        for name, v in values.items():
            self.buf[name].append(v)

    def flush(self) -> None:
        for k, parts in self.buf.items():
            if parts:
                arr = np.asarray(parts, self.dtypes[k]) if not isinstance(parts[0], np.ndarray) else np.concatenate(parts)
                self.files[k].write(arr.tobytes())
                parts.clear()

    def commit(self, meta: dict) -> None:
        self.flush()
        for f in self.files.values():
            f.close()
        (self.tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        atomic.commit(self.tmp, self.final)


def _load_raw(d: Path, name: str, dtype) -> np.ndarray:
    p = d / f"{name}.bin"
    # np.asarray: a plain ndarray view of the map (slicing a np.memmap subclass is ~3x slower)
    return np.asarray(np.memmap(p, dtype=dtype, mode="r")) if p.stat().st_size else np.zeros(0, dtype)


# ----------------------------------------------------------------------------- pass 1: tokenize

@dataclass
class _TokJob:
    unit: Unit
    out: str


_W: dict = {}  # per-worker-process state set by the pool initializer


def _init_worker(state: dict) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one worker = one core, so --workers means what it says
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler (inherited by fork): terminate() must kill
    _W.clear()
    _W.update(state)
    _exit_with_parent()


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A worker leaves within ``poll_s`` once its parent is gone (``kill -9``, the OOM killer):
    nobody would read its results, and it would hold a core and memory for nothing."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _tokenize_unit(job: _TokJob) -> dict:
    try:
        return _tokenize_unit_inner(job)
    except OSError as e:  # unreadable input, or a full or read-only output disk: name the file at fault
        writing = e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)
        where = e.filename or (f"output {job.out}" if writing else job.unit.label())
        raise DataPrepError(f"{where}: {e.strerror or e}") from None


def _tokenize_unit_inner(job: _TokJob) -> dict:
    import blingfire

    cfg: BuildConfig = _W["cfg"]
    vocab: Vocab = _W["vocab"]
    tok = _W.get("tokenizer")
    if tok is None:
        tok = _W["tokenizer"] = vocab.tokenizer()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    specials = list(vocab.special_ids)
    sep_text, sep_id = "[SEP]", vocab.special_ids["[SEP]"]
    max_sent = max(cfg.seq_lens) - 3
    dtype = _token_dtype(vocab.size)
    stats = ReadStats()
    # Offsets (not lengths) go to disk, so pass 2 memory-maps them instead of holding cumsums in RAM.
    out = _Appender(Path(job.out), {"tokens": dtype, "sent_off": np.int64, "doc_off": np.int64})
    out.add("sent_off", [0])
    out.add("doc_off", [0])
    # One string per paragraph with its sentences joined by " [SEP] ": one encode call per paragraph
    # instead of per sentence (~10% less tokenizer time), and the [SEP] ids mark the boundaries.
    # Batches are cut by size, also inside a document (a book is one), so memory stays bounded.
    pending: list[str] = []
    pending_doc: list[int] = []  # document serial number of each pending paragraph
    pending_nsent: list[int] = []  # sentences joined in each pending paragraph
    pending_chars = 0
    ended: list[int] = []  # documents read to the end whose end is not written yet
    carried = 0  # sentences already written of the document still being read
    counts = {"sentences": 0, "tokens": 0, "empty_documents": 0, "split_sentences": 0, "chars": 0}

    def encode_pending() -> None:
        nonlocal pending_chars, carried
        ids_lists = [e.ids for e in encode(pending, add_special_tokens=False)]
        # every sentence now ends with exactly one [SEP]: the joins, plus one appended per paragraph
        ids = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(
            (x, (sep_id,)) for x in ids_lists)), np.int64)
        is_sep = ids == sep_id
        ends = np.flatnonzero(is_sep)
        if len(ends) != sum(pending_nsent):
            raise DataPrepError(f"{job.unit.label()}: the tokenizer does not keep [SEP] as one special token; "
                                f"use a BERT WordPiece vocab")
        lens = np.diff(np.concatenate([[-1], ends])) - 1
        sent_doc = np.repeat(np.asarray(pending_doc, np.int64), pending_nsent)
        keep = lens > 0  # a sentence that tokenized to nothing (control characters) is dropped
        lens, sent_doc = lens[keep], sent_doc[keep]
        if lens.size and lens.max() > max_sent:  # a sentence longer than any sample is cut in pieces
            pieces = -(-lens // max_sent)
            counts["split_sentences"] += int((pieces - 1).sum())
            sent_doc = np.repeat(sent_doc, pieces)
            lens = np.concatenate([[max_sent] * (k - 1) + [n - max_sent * (k - 1)] for n, k in zip(lens, pieces)])
        tokens = ids[~is_sep]
        out.add("tokens", tokens.astype(dtype))
        out.add("sent_off", counts["tokens"] + np.cumsum(lens))
        # sentence counts at each ended document's end (sent_doc is sorted: documents come in order)
        doc_ends = []
        for serial in ended:
            upto = int(np.searchsorted(sent_doc, serial, side="right"))
            n = carried + upto - (int(np.searchsorted(sent_doc, serial, side="left")))
            carried = 0
            if n:
                doc_ends.append(counts["sentences"] + upto)
            else:
                counts["empty_documents"] += 1
        carried += len(lens) - (int(np.searchsorted(sent_doc, ended[-1], side="right")) if ended else 0)
        out.add("doc_off", doc_ends)
        counts["sentences"] += len(lens)
        counts["tokens"] += len(tokens)
        live = _W.get("live")
        if live is not None:
            with live.get_lock():
                live[0] += len(ended)
                live[1] += len(tokens)
        pending.clear()
        pending_doc.clear()
        pending_nsent.clear()
        ended.clear()
        pending_chars = 0
        out.flush()

    for serial, doc in enumerate(iter_documents(
            job.unit, stats, min_doc_chars=cfg.min_doc_chars, max_doc_chars=cfg.max_doc_chars,
            max_line_chars=cfg.max_line_chars, text_key=cfg.text_key)):
        for para in doc:
            counts["chars"] += len(para)
            if "[" in para:  # literal special tokens ("[SEP]" in an article about BERT) stay plain text
                for t in specials:
                    para = para.replace(t, t[0] + " " + t[1:])
            sents = [x for x in blingfire.text_to_sentences(para).split("\n") if x.strip()]
            if sents:
                pending_chars += len(para)
                pending.append(f" {sep_text} ".join(sents))
                pending_doc.append(serial)
                pending_nsent.append(len(sents))
            # enough per call to amortise it, few enough that the tokenizer's ~60 bytes of
            # bookkeeping per token stay small
            if len(pending) >= 2048 or pending_chars >= _ENCODE_CHARS:
                encode_pending()
        ended.append(serial)
    if pending or ended:
        encode_pending()
    problems = {k: getattr(stats, k) for k in ("invalid_utf8", "long_lines", "short_documents", "split_documents",
                                                "bad_records")}
    if stats.invalid_utf8:  # counted while decoding: say where
        stats.messages.insert(0, f"{job.unit.label()}: {stats.invalid_utf8} invalid UTF-8 byte sequence(s), "
                                 "replaced by U+FFFD (is the file in another encoding?)")
    problems["empty_documents"] = counts.pop("empty_documents")  # text that tokenized to nothing
    problems["split_sentences"] = counts.pop("split_sentences")
    meta = {"unit": job.unit.label(), "format": job.unit.fmt, "documents": stats.documents - problems["empty_documents"],
            **counts, "problems": problems, "messages": stats.messages}
    out.commit(meta)
    return meta


# ----------------------------------------------------------------------------- pass 2: pair

class _TokUnit:
    """A tokenized unit, memory-mapped."""

    def __init__(self, d: str, dtype):
        p = Path(d)
        self.tokens = _load_raw(p, "tokens", dtype)
        self.sent_off = _load_raw(p, "sent_off", np.int64)
        self.doc_off = _load_raw(p, "doc_off", np.int64)

    def doc(self, i: int) -> "_DocView":
        return _DocView(self, int(self.doc_off[i]), int(self.doc_off[i + 1]))


class _DocView:
    """The sentences of one document, sliced on demand (a book has tens of thousands)."""

    def __init__(self, u: _TokUnit, lo: int, hi: int):
        self.u, self.lo, self.hi = u, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, j: int) -> np.ndarray:
        s = self.lo + j
        return self.u.tokens[self.u.sent_off[s]:self.u.sent_off[s + 1]]

    def all(self) -> list[np.ndarray]:
        off, t = self.u.sent_off, self.u.tokens
        return [t[off[s]:off[s + 1]] for s in range(self.lo, self.hi)]


@dataclass
class _PairJob:
    index: int  # unit index in the global (sorted) order: part of every RNG seed
    seq_len: int
    max_predictions: int
    out: str


def _pair_unit(job: _PairJob) -> dict:
    try:
        return _pair_unit_inner(job)
    except OSError as e:  # disk full, work files removed under us
        raise DataPrepError(f"pairing unit {job.index} into {job.out}: {e.strerror or e}") from None


def _pair_unit_inner(job: _PairJob) -> dict:
    cfg: BuildConfig = _W["cfg"]
    vocab: Vocab = _W["vocab"]
    tok_dirs: list[str] = _W["tok_dirs"]
    doc_cum: np.ndarray = _W["doc_cum"]
    dtype = _token_dtype(vocab.size)
    load = _W.get("load")
    if load is None:  # an LRU of opened units: random "next" segments may come from any of them
        load = _W["load"] = functools.lru_cache(maxsize=64)(lambda i: _TokUnit(tok_dirs[i], dtype))
    ids = vocab.special_ids
    cls_, sep = ids["[CLS]"], ids["[SEP]"]
    spec = _W.get(("spec", job.max_predictions))
    if spec is None:  # built once per worker: scanning a 30k vocab per unit adds up over thousands of files
        spec = _W[("spec", job.max_predictions)] = MaskSpec.from_tokens(
            vocab.tokens, ids["[MASK]"], ids.values(), mask_prob=cfg.mask_prob, max_predictions=job.max_predictions,
            whole_word=cfg.whole_word_mask)
    static = cfg.masking == "static"
    opt = PairOptions(job.seq_len, cfg.pair_task, cfg.short_seq_prob)
    names = {"tokens": dtype, "length": np.uint16, "a_len": np.uint16, "label": np.uint8, "doc": np.int64}
    if static:
        names |= {"mask_count": np.uint16, "mask_pos": np.uint16, "mask_label": dtype}
    out = _Appender(Path(job.out), names)
    unit = load(job.index)
    total_docs = int(doc_cum[-1])
    heldout = _W.get("heldout")  # per global document: in the held-out set (None: no split)
    counts = {"samples": 0, "tokens": 0, "masked": 0, "label_0": 0, "label_1": 0}
    buffered = 0
    for dupe in range(cfg.dupe_factor):
        rng = np.random.default_rng([cfg.seed, job.seq_len, dupe, job.index])
        for d in range(len(unit.doc_off) - 1):
            gdoc = int(doc_cum[job.index]) + d
            # A random "next" segment comes from the document's own side of the split: held-out
            # text never enters a training sample, and the held-out samples use held-out text only.
            pool = None if heldout is None else _W["heldout_ids" if heldout[gdoc] else "train_ids"]

            def random_doc(r: np.random.Generator, _self=gdoc, _pool=pool) -> _DocView:
                for _ in range(10):
                    g = int(r.integers(0, total_docs)) if _pool is None else int(_pool[r.integers(0, len(_pool))])
                    if g != _self:
                        break
                u = int(np.searchsorted(doc_cum, g, side="right") - 1)
                return load(u).doc(g - int(doc_cum[u]))

            for a, b, label in document_pairs(unit.doc(d).all(), rng, opt, random_doc):
                la, n = len(a), len(a) + len(b) + 3
                sample = np.empty(n, dtype)
                sample[0], sample[la + 1], sample[n - 1] = cls_, sep, sep
                sample[1:la + 1] = a
                sample[la + 2:n - 1] = b
                if static:
                    sample, pos, lab = mask_sample(sample, rng, spec)
                    out.add_scalars(mask_count=len(pos))
                    out.add("mask_pos", pos)
                    out.add("mask_label", lab)
                    counts["masked"] += len(pos)
                else:  # what one epoch of dynamic masking will draw (an upper bound with whole words)
                    n_cand = len(sample) - int(spec.special[sample].sum())
                    counts["masked"] += min(spec.max_predictions, max(1, int(round(n_cand * spec.mask_prob)))) \
                        if n_cand else 0
                out.add("tokens", sample)
                out.add_scalars(length=n, a_len=la + 2, label=label, doc=gdoc)
                counts["samples"] += 1
                counts["tokens"] += len(sample)
                counts[f"label_{label}"] += 1
                buffered += len(sample)
                if buffered >= _FLUSH_TOKENS:
                    out.flush()
                    buffered = 0
    out.commit(counts)
    # Unmap the units read for random segments: their touched pages would otherwise stay in this
    # worker's RSS and grow with the corpus (they remain in the page cache for the next job).
    load.cache_clear()
    return counts


# ----------------------------------------------------------------------------- pass 3: shard

class _ShardOf:
    """Which shard each sample goes to, in sample order: round-robin over all K shards, or with a
    held-out set, training samples round-robin over the first K - H shards and samples of held-out
    documents over the last H (so each group's shards differ by at most one sample)."""

    def __init__(self, K: int, H: int, heldout: np.ndarray | None) -> None:
        self.K, self.H, self.heldout = K, H, heldout
        self.seen = np.zeros(2, np.int64)  # training, held-out samples assigned so far

    def __call__(self, docs: np.ndarray) -> np.ndarray:
        if self.heldout is None:
            out = (self.seen[0] + np.arange(len(docs))) % self.K
            self.seen[0] += len(docs)
            return out
        held = self.heldout[docs]
        out = np.empty(len(docs), np.int64)
        n_held = int(held.sum())
        out[~held] = (self.seen[0] + np.arange(len(docs) - n_held)) % (self.K - self.H)
        out[held] = self.K - self.H + (self.seen[1] + np.arange(n_held)) % self.H
        self.seen += (len(docs) - n_held, n_held)
        return out


def _write_shards(seq_dir: Path, pair_dirs: list[Path], cfg: BuildConfig, dtype, progress,
                  heldout: np.ndarray | None = None) -> list[dict]:
    K = cfg.shards
    static = cfg.masking == "static"
    # Sizes first (lengths only), so each shard file is laid out once and filled in place.
    n_samples = np.zeros(K, np.int64)
    n_tokens = np.zeros(K, np.int64)
    n_masks = np.zeros(K, np.int64)
    base = 0
    shard_of = _ShardOf(K, cfg.heldout_shards, heldout)
    for d in pair_dirs:
        lengths = _load_raw(d, "length", np.uint16)
        shard = shard_of(_load_raw(d, "doc", np.int64))
        n_samples += np.bincount(shard, minlength=K)
        n_tokens += np.bincount(shard, weights=lengths, minlength=K).astype(np.int64)
        if static:
            n_masks += np.bincount(shard, weights=_load_raw(d, "mask_count", np.uint16), minlength=K).astype(np.int64)
        base += len(lengths)
    total = base
    if (n_samples == 0).any():
        what = "held-out " if heldout is not None and (n_samples[K - cfg.heldout_shards:] == 0).any() else ""
        raise DataPrepError(f"only {total} samples at seq len {seq_dir.name[3:]}: some {what}shards of --shards {K} "
                            "would be empty; give more text or fewer shards" +
                            (" (or --heldout-shards 0)" if what else ""))
    width = max(5, len(str(K - 1)))
    for leftover in seq_dir.glob(".shard_*.tmp*"):  # shards a killed run left unfinished
        atomic.discard(leftover)
    writers = []
    for k in range(K):
        specs = {"tokens": (dtype, n_tokens[k]), "offsets": (np.int64, n_samples[k] + 1),
                 "a_len": (np.uint16, n_samples[k]), "label": (np.uint8, n_samples[k]), "doc": (np.int64, n_samples[k])}
        if static:
            specs |= {"mask_offsets": (np.int64, n_samples[k] + 1), "mask_pos": (np.uint16, n_masks[k]),
                      "mask_label": (dtype, n_masks[k])}
        w = shardio.ShardWriter(seq_dir / f"shard_{k:0{width}d}.bin", specs,
                                {"shard": k, "num_shards": K, "num_samples": int(n_samples[k])})
        w.append_many({"offsets": np.zeros(1, np.int64), **({"mask_offsets": np.zeros(1, np.int64)} if static else {})})
        writers.append(w)
    tok_cursor = np.zeros(K, np.int64)
    mask_cursor = np.zeros(K, np.int64)

    group: list[tuple[int, Path, int, int]] = []
    job_seq_len = int(seq_dir.name[3:])  # a bound on tokens per sample, for sizing merge groups
    group_tokens = 0
    base = 0

    shard_of = _ShardOf(K, cfg.heldout_shards, heldout)  # replays the assignment of the sizes pass

    def flush() -> None:
        nonlocal group, group_tokens
        per_shard: list[dict[str, list]] = [dict() for _ in range(K)]
        for gbase, d, lo, hi in group:
            sid = shard_of(_load_raw(d, "doc", np.int64)[lo:hi])
            order = np.argsort(sid, kind="stable")  # block-relative rows of each shard, in order
            bounds = np.searchsorted(sid[order], np.arange(K + 1))
            length = _load_raw(d, "length", np.uint16)
            off = np.concatenate([[0], np.cumsum(length[lo:hi], dtype=np.int64)])
            toks = _load_raw(d, "tokens", dtype)
            cols = {"a_len": _load_raw(d, "a_len", np.uint16), "label": _load_raw(d, "label", np.uint8),
                    "doc": _load_raw(d, "doc", np.int64)}
            if static:
                mcount = _load_raw(d, "mask_count", np.uint16)
                moff = np.concatenate([[0], np.cumsum(mcount[lo:hi], dtype=np.int64)])
                mpos, mlab = _load_raw(d, "mask_pos", np.uint16), _load_raw(d, "mask_label", dtype)
            for k in range(K):
                rows = order[bounds[k]:bounds[k + 1]]
                if len(rows) == 0:
                    continue
                parts = per_shard[k]
                parts.setdefault("tokens", []).append(toks[_ragged(off, rows) + block_start[d][0]])
                parts.setdefault("lengths", []).append(length[lo + rows].astype(np.int64))
                for name, col in cols.items():
                    parts.setdefault(name, []).append(col[lo + rows])
                if static:
                    flat = _ragged(moff, rows) + block_start[d][1]
                    parts.setdefault("mask_pos", []).append(mpos[flat])
                    parts.setdefault("mask_label", []).append(mlab[flat])
                    parts.setdefault("mask_counts", []).append(mcount[lo + rows].astype(np.int64))
            block_start[d] = (block_start[d][0] + int(off[-1]), block_start[d][1] + (int(moff[-1]) if static else 0))
        for k, parts in enumerate(per_shard):
            if not parts:
                continue
            arrays = {name: np.concatenate(v) for name, v in parts.items()}
            lengths = arrays.pop("lengths")
            arrays["offsets"] = tok_cursor[k] + np.cumsum(lengths)
            tok_cursor[k] += lengths.sum()
            if static:
                mc = arrays.pop("mask_counts")
                arrays["mask_offsets"] = mask_cursor[k] + np.cumsum(mc)
                mask_cursor[k] += mc.sum()
            writers[k].append_many(arrays)
        group, group_tokens = [], 0

    block_start: dict[Path, tuple[int, int]] = {}  # (token, mask) offset where a unit's next block starts
    try:
        for d in pair_dirs:
            n = int((d / "length.bin").stat().st_size // 2)
            block_start[d] = (0, 0)
            for lo in range(0, n, _MERGE_BLOCK_SAMPLES):
                hi = min(n, lo + _MERGE_BLOCK_SAMPLES)
                group.append((base, d, lo, hi))
                group_tokens += (hi - lo) * job_seq_len
                if group_tokens >= _MERGE_GROUP_TOKENS:
                    flush()
            base += n
            progress.update(1)
        flush()
        shards = []
        for k, w in enumerate(writers):
            digest = w.close()
            shards.append({"path": w.path.name, "num_samples": int(n_samples[k]), "num_tokens": int(n_tokens[k]),
                           "sha256": digest})
    except BaseException:  # Ctrl-C or an error: no half-written shard stays behind
        for w in writers:
            w.discard()
        raise
    return shards


def _ragged(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat indices of the variable-length rows `rows` of a ragged array with the given offsets."""
    starts, ends = offsets[rows], offsets[rows + 1]
    lens = ends - starts
    if lens.sum() == 0:
        return np.zeros(0, np.int64)
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return np.arange(lens.sum()) + shift


# ----------------------------------------------------------------------------- driver

def _progress(cfg: BuildConfig, **kw):
    from tqdm import tqdm

    return tqdm(disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr, mininterval=1.0, **kw)


_CTX = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _pool(cfg: BuildConfig, state: dict) -> ProcessPoolExecutor:
    # concurrent.futures rather than multiprocessing.Pool: a worker killed by the OOM killer raises
    # BrokenProcessPool here instead of hanging the build forever.
    return ProcessPoolExecutor(cfg.workers, mp_context=_CTX, initializer=_init_worker, initargs=(state,))


def _run(pool: ProcessPoolExecutor, fn, jobs, bar, live=None) -> None:
    """Run jobs; the bar counts finished units, its postfix shows live docs/s and tokens/s that
    workers report after every encoded batch (a single huge file still shows progress)."""
    futures = {pool.submit(fn, j) for j in jobs}
    t0 = time.perf_counter()
    try:
        pending = futures
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raises a worker's DataPrepError here
            if live is not None:
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{live[0] / dt:,.0f} docs/s, {live[1] / dt:,.0f} tokens/s", refresh=False)
            bar.update(len(done))
    except KeyboardInterrupt:
        # Workers ignore SIGINT; stop them now rather than let them finish their files. The futures
        # are left alone: the pool marks them broken itself, and cancelling them first makes
        # Python 3.11's executor thread fail with InvalidStateError (a traceback on Ctrl-C).
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        raise
    except BrokenProcessPool:
        raise DataPrepError("a worker process died (killed, or out of memory?); finished pieces are kept: "
                            "rerun the same command to resume") from None
    except BaseException:
        for f in futures:  # a worker's error: drop the jobs not started yet
            f.cancel()
        raise


def build(cfg: BuildConfig) -> dict[int, dict]:
    """Run (or resume) a build; returns the manifest of each seq len."""
    out = Path(cfg.output)
    vocab = load_vocab(cfg.vocab, cfg.lowercase)
    units, skipped = discover(cfg.inputs, cfg.fmt, exclude=cfg.output)
    if not units:
        why = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5]) or "no files"
        raise DataPrepError(f"no usable input ({why})")
    for sk in skipped[:20]:
        print(f"data_prep: skipping {sk['path']}: {sk['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"data_prep: ... and {len(skipped) - 20} more skipped inputs (all listed in manifest.json)", file=sys.stderr)
    max_preds = cfg.max_predictions or tuple(default_max_predictions(L, cfg.mask_prob) for L in cfg.seq_lens)
    dtype = _token_dtype(vocab.size)
    # What the bytes of each piece depend on; anything else (workers, progress) may change freely.
    read_opts = (vocab.sha256, cfg.min_doc_chars, cfg.max_doc_chars, cfg.max_line_chars, cfg.text_key,
                 max(cfg.seq_lens), FORMAT_VERSION)

    def unit_key(u: Unit) -> str:
        st = os.stat(u.path) if os.path.isfile(u.path) else os.stat(Path(u.path) / "state.json") \
            if (Path(u.path) / "state.json").exists() else os.stat(u.path)
        return _hash(u.path, u.fmt, u.start, u.stop, u.split, st.st_size, st.st_mtime_ns, read_opts)

    keys = [unit_key(u) for u in units]
    build_opts = {k: v for k, v in cfg.to_dict().items()
                  if k not in ("workers", "progress", "keep_work", "overwrite", "output", "inputs", "vocab")}
    build_id = _hash(keys, build_opts, max_preds)
    seq_dirs = {L: out / f"seq{L}" for L in cfg.seq_lens}
    manifests = {}
    for L, d in seq_dirs.items():
        m = d / "manifest.json"
        if m.is_file():
            old = json.loads(m.read_text())
            if old.get("build_id") == build_id:
                manifests[L] = old
            elif not cfg.overwrite:
                raise DataPrepError(f"{d} already holds a build with other inputs or options; "
                                    f"choose a new --output or pass --overwrite")
    if len(manifests) == len(seq_dirs):
        print(f"data_prep: {out} is already complete for these inputs and options; nothing to do", file=sys.stderr)
        return manifests
    work = out / ".work"
    (work / "tok").mkdir(parents=True, exist_ok=True)
    for leftover in work.glob("*/*.tmp*"):  # pieces of an interrupted run; finished pieces are kept
        shutil.rmtree(leftover, ignore_errors=True)

    state = {"cfg": cfg, "vocab": vocab, "live": _CTX.Array("q", 2)}  # live: documents, tokens done
    tok_dirs = [str(work / "tok" / k) for k in keys]
    metas: dict[int, dict] = {}
    todo = []
    for i, (u, d) in enumerate(zip(units, tok_dirs)):
        if (Path(d) / "meta.json").is_file():
            metas[i] = json.loads((Path(d) / "meta.json").read_text())
        else:
            todo.append(i)
    t0 = time.perf_counter()
    try:
        if todo:
            with _pool(cfg, state) as pool, _progress(cfg, total=len(units), initial=len(units) - len(todo),
                                                       desc="tokenize", unit="file") as bar:
                _run(pool, _tokenize_unit, [_TokJob(units[i], tok_dirs[i]) for i in todo], bar, state["live"])
            for i in todo:
                metas[i] = json.loads((Path(tok_dirs[i]) / "meta.json").read_text())
        tokenize_s = time.perf_counter() - t0

        # Units with no documents take no part in pairing (and cannot be drawn as random documents).
        live = [i for i in range(len(units)) if metas[i]["documents"] > 0]
        if not live:
            def why(meta: dict) -> str:
                if meta["messages"]:
                    return meta["messages"][0]
                found = ", ".join(f"{k}={v}" for k, v in meta["problems"].items() if v)
                return f"{meta['unit']}: no documents ({found or 'no text'})"

            raise DataPrepError("the inputs hold no usable text: " + "; ".join(
                why(metas[i]) for i in range(min(3, len(units)))))
        doc_counts = np.array([metas[i]["documents"] for i in live], np.int64)
        state |= {"tok_dirs": [tok_dirs[i] for i in live], "doc_cum": np.concatenate([[0], np.cumsum(doc_counts)])}
        heldout = _heldout_documents(int(doc_counts.sum()), cfg)
        if heldout is not None:
            state |= {"heldout": heldout, "heldout_ids": np.flatnonzero(heldout), "train_ids": np.flatnonzero(~heldout)}
        pair_dirs: dict[int, list[Path]] = {}
        corpus_key = _hash([keys[x] for x in live])
        jobs = []
        for L, mp_ in zip(cfg.seq_lens, max_preds):
            if L in manifests:
                continue
            (work / f"seq{L}").mkdir(exist_ok=True)
            pair_dirs[L] = []
            for j, i in enumerate(live):  # random B segments may come from any unit: all of them are in the key
                d = work / f"seq{L}" / _hash(keys[i], j, corpus_key, build_opts, L, mp_)
                pair_dirs[L].append(d)
                if not (d / "meta.json").is_file():
                    jobs.append(_PairJob(j, L, mp_, str(d)))
        t1 = time.perf_counter()
        if jobs:
            with _pool(cfg, state) as pool, _progress(cfg, total=len(jobs), desc="pair+mask", unit="file") as bar:
                _run(pool, _pair_unit, jobs, bar)
        pair_s = time.perf_counter() - t1
    except KeyboardInterrupt:
        print(f"data_prep: interrupted; finished pieces are kept in {work}: run the same command again to resume",
              file=sys.stderr)
        raise

    # Totals over the corpus, shared by every seq len.
    problems: dict[str, int] = {}
    messages = []
    for i in range(len(units)):
        for k, v in metas[i]["problems"].items():
            problems[k] = problems.get(k, 0) + v
        messages.extend(metas[i]["messages"])
    corpus = {"documents": sum(metas[i]["documents"] for i in range(len(units))),
              "sentences": sum(metas[i]["sentences"] for i in range(len(units))),
              "tokens": sum(metas[i]["tokens"] for i in range(len(units))),
              "characters": sum(metas[i]["chars"] for i in range(len(units)))}
    vocab_dir = out / "vocab"
    _write_vocab_dir(vocab, vocab_dir)
    for L, mp_ in zip(cfg.seq_lens, max_preds):
        if L in manifests:
            continue
        d = seq_dirs[L]
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").unlink(missing_ok=True)  # the manifest marks completion: written last
        for old in d.glob("shard_*.bin*"):
            old.unlink()
        t2 = time.perf_counter()
        with _progress(cfg, total=len(pair_dirs[L]), desc=f"shards seq{L}", unit="file") as bar:
            shards = _write_shards(d, pair_dirs[L], cfg, dtype, bar, heldout)
        counts = {"samples": 0, "tokens": 0, "masked": 0, "label_0": 0, "label_1": 0}
        for p in pair_dirs[L]:
            for k, v in json.loads((p / "meta.json").read_text()).items():
                counts[k] += v
        manifest = {
            "format": FORMAT_VERSION,
            "build_id": build_id,
            "seq_len": L,
            "num_samples": counts["samples"],
            "num_tokens": counts["tokens"],
            "num_masked_positions": counts["masked"],
            "masking": cfg.masking,
            "mask_prob": cfg.mask_prob,
            "max_predictions_per_seq": mp_,
            "whole_word_mask": cfg.whole_word_mask,
            "pair_task": cfg.pair_task,
            "pair_labels": {"0": counts["label_0"], "1": counts["label_1"]},
            "dupe_factor": cfg.dupe_factor,
            "short_seq_prob": cfg.short_seq_prob,
            "seed": cfg.seed,
            "token_dtype": dtype.str,
            "vocab": {"path": "../vocab", "size": vocab.size, "lowercase": vocab.lowercase, "sha256": vocab.sha256,
                      "special_ids": vocab.special_ids},
            "corpus": corpus,
            "inputs": [{"path": units[i].label(), "format": units[i].fmt, "documents": metas[i]["documents"],
                        "tokens": metas[i]["tokens"],
                        **({"problems": {k: v for k, v in metas[i]["problems"].items() if v}}
                           if any(metas[i]["problems"].values()) else {})} for i in range(len(units))],
            "skipped": skipped + [{"path": units[i].label(), "reason": "no usable text"}
                                  for i in range(len(units)) if metas[i]["documents"] == 0],
            "problems": problems,
            "warnings": messages[:100],
            "num_shards": cfg.shards,
            "shards": shards,
            "split": _split_record(cfg, heldout, shards),
        }
        if cfg.masking == "dynamic":
            manifest["note"] = ("masks are drawn at load time from an RNG seeded by (seed, epoch, index); "
                                "num_masked_positions is per epoch" + (" (at most, with whole-word masking)"
                                                                       if cfg.whole_word_mask else ""))
        atomic.write_json(d / "manifest.json", manifest, sort_keys=True)
        manifests[L] = manifest
        print(f"data_prep: seq{L}: {counts['samples']:,} samples, {counts['tokens']:,} tokens in {cfg.shards} shards "
              f"({time.perf_counter() - t2:.1f} s to write) -> {d}", file=sys.stderr)
    total_s = time.perf_counter() - t0
    print(f"data_prep: {corpus['documents']:,} documents, {corpus['tokens']:,} tokens; tokenize {tokenize_s:.1f} s, "
          f"pair {pair_s:.1f} s, total {total_s:.1f} s ({corpus['tokens'] / max(total_s, 1e-9):,.0f} tokens/s)",
          file=sys.stderr)
    if problems and any(problems.values()):
        print("data_prep: input problems: " + ", ".join(f"{k}={v}" for k, v in problems.items() if v)
              + " (per file in manifest.json 'inputs', details in 'warnings')", file=sys.stderr)
        for i in range(len(units)):
            if metas[i]["problems"].get("invalid_utf8"):
                print(f"data_prep:   {units[i].label()}: {metas[i]['problems']['invalid_utf8']} invalid UTF-8 "
                      "sequence(s)", file=sys.stderr)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifests


def _heldout_documents(n_docs: int, cfg: BuildConfig) -> np.ndarray | None:
    """Per document (global index): in the held-out set, a random H/K of all documents, drawn from
    the build's seed (the same documents at every seq len)."""
    if cfg.heldout_shards == 0:
        return None
    rng = np.random.default_rng([cfg.seed, 0x5EED, n_docs])
    held = rng.random(n_docs) < cfg.heldout_shards / cfg.shards
    if not held.any() or held.all():
        raise DataPrepError(f"{n_docs} document(s) are too few to hold out {cfg.heldout_shards} of --shards "
                            f"{cfg.shards} by document; give more text, or --heldout-shards 0")
    return held


def _split_record(cfg: BuildConfig, heldout: np.ndarray | None, shards: list[dict]) -> dict:
    """The manifest's record of the held-out split (pretrain/data.py reads it)."""
    K, H = cfg.shards, cfg.heldout_shards
    if heldout is None:
        return {"method": "none", "heldout_shards": []}
    return {"method": "documents", "heldout_shards": list(range(K - H, K)),
            "heldout_documents": int(heldout.sum()), "train_documents": int((~heldout).sum()),
            "heldout_samples": int(sum(s["num_samples"] for s in shards[K - H:])),
            "train_samples": int(sum(s["num_samples"] for s in shards[:K - H])),
            "note": "held-out documents feed no training sample, not even as a random next segment"}


def _write_vocab_dir(vocab: Vocab, d: Path) -> None:
    """A copy of the vocab next to the data, so training and export need no other path."""
    if (d / "vocab.txt").is_file() and load_vocab(d).sha256 == vocab.sha256:
        return
    save_dir(vocab.tokens, vocab.lowercase, d)
