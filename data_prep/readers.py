"""Input discovery and per-format document readers.

Every reader yields documents as lists of paragraphs (str); sentence splitting happens later, once,
for all formats. Readers stream: memory holds one document (capped by ``max_doc_chars``) and one
line (capped by ``max_line_chars`` for line-based text), never a whole file.
"""
from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import html
import io
import json
import lzma
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

FORMATS = ("auto", "text", "wiki", "gutenberg", "jsonl", "hf")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_GUTENBERG_START = re.compile(r"^\s*\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(r"^\s*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)
_HF_ROWS_PER_UNIT = 50_000


class DataPrepError(Exception):
    """A problem with the user's input or options; the message names the file, line or key."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: a file, or a row range of a `datasets` directory."""

    path: str
    fmt: str
    start: int = 0
    stop: int = -1
    split: str = ""

    def label(self) -> str:
        if self.fmt == "hf":
            return f"{self.path}[{self.split + ':' if self.split else ''}{self.start}:{self.stop}]"
        return self.path


@dataclass
class ReadStats:
    """Per-unit counters that end up in the manifest."""

    documents: int = 0
    invalid_utf8: int = 0
    long_lines: int = 0
    short_documents: int = 0
    split_documents: int = 0
    bad_records: int = 0
    messages: list = field(default_factory=list)

    def warn(self, msg: str) -> None:
        if len(self.messages) < 20:  # enough to diagnose; a broken file must not flood the manifest
            self.messages.append(msg)


def _is_hf_dir(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _head(path: str, n: int = 65536) -> bytes:
    opener = _COMPRESSED.get(Path(path).suffix.lower(), open)
    with opener(path, "rb") as f:
        return f.read(n)


def _not_text(head: bytes) -> str | None:
    """Why the first bytes of a file are not UTF-8 text, or None. UTF-16 is told apart from binary
    data by its NUL bytes: in UTF-16 text of Latin-script languages they sit at every other byte."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16 text (convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8)"
    sample = head[:8192]
    if b"\x00" in sample:
        even, odd = sample[0::2], sample[1::2]
        for zeros, other, order in ((odd, even, "LE"), (even, odd, "BE")):
            if zeros.count(0) > 0.4 * len(zeros) and other.count(0) < 0.05 * len(other):
                return (f"UTF-16{order} text without a byte-order mark (convert it to UTF-8, e.g. "
                        f"iconv -f UTF-16{order} -t UTF-8)")
        return "binary file (NUL bytes in the first 8 KiB)"
    # Binary data without NUL bytes: much of it is not UTF-8, or is control characters.
    text = sample.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f\v")
    if len(text) >= 64 and (bad + control) > 0.1 * len(text):
        return (f"binary file ({100 * (bad + control) / len(text):.0f}% of the first {len(sample):,} bytes are "
                "not UTF-8 text)")
    return None


def sniff(path: str, fmt: str) -> tuple[str | None, str | None]:
    """(format, None) for a usable file, or (None, reason) for one to skip."""
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file"
        head = _head(path)
    except (EOFError, lzma.LZMAError) as e:  # a truncated or corrupt compressed stream
        return None, f"unreadable compressed file ({e})"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    if not head.strip():
        return None, "empty file (only white space)"
    not_text = _not_text(head)
    if not_text:
        return None, not_text
    if fmt != "auto":
        return fmt, None
    name = Path(path).name.lower()
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl", None
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    if text.lstrip().startswith("<doc "):
        return "wiki", None
    if any(_GUTENBERG_START.match(line) for line in text.splitlines()):
        return "gutenberg", None
    return "text", None


def discover(inputs: list[str], fmt: str = "auto", exclude: str | None = None) -> tuple[list[Unit], list[dict]]:
    """Expand files, globs and directories into units (sorted, so the order never depends on the
    file system) plus the list of skipped paths with reasons. Raises on paths that do not exist.
    Files under ``exclude`` (the build's own output, when it lies inside an input) are ignored."""
    if fmt not in FORMATS:
        raise DataPrepError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    units: list[Unit] = []
    skipped: list[dict] = []
    seen: set[str] = set()

    skip_root = os.path.realpath(exclude) if exclude else None

    def add_file(path: str) -> None:
        if path in seen or (skip_root and os.path.realpath(path).startswith(skip_root + os.sep)):
            return
        seen.add(path)
        got, reason = sniff(path, fmt)
        if got is None:
            skipped.append({"path": path, "reason": reason})
        elif got == "hf":
            raise DataPrepError(f"{path}: --format hf needs a directory written by datasets' save_to_disk")
        else:
            units.append(Unit(path, got))

    for spec in inputs:
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataPrepError(f"input {spec!r}: the pattern matches no file")
        else:
            if not os.path.exists(spec):
                raise DataPrepError(f"input {spec!r}: no such file or directory")
            matches = [spec]
        for m in matches:
            p = Path(m)
            if p.is_dir() and (fmt in ("auto", "hf")) and _is_hf_dir(p):
                units.extend(_hf_units(str(p)))
            elif p.is_dir():
                if fmt == "hf":
                    raise DataPrepError(f"{p}: not a datasets directory (no dataset_info.json/state.json or dataset_dict.json)")
                files, hf_dirs = [], []
                for root, dirs, names in os.walk(p):
                    dirs[:] = [x for x in dirs if not x.startswith(".")]  # hidden: .git, .work, ...
                    if fmt == "auto" and root != str(p) and _is_hf_dir(Path(root)):
                        hf_dirs.append(root)  # a datasets directory is one input, not a pile of files
                        dirs[:] = []
                        continue
                    files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
                if not files and not hf_dirs:
                    skipped.append({"path": str(p), "reason": "directory holds no files"})
                for f in sorted(files + hf_dirs):
                    if f in hf_dirs:
                        units.extend(_hf_units(f))
                    else:
                        add_file(f)
            elif p.is_file():
                add_file(str(p))
    return units, skipped


def _hf_units(path: str) -> list[Unit]:
    import datasets  # slow import; only when a datasets directory is given

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the path, the library's text kept
        raise DataPrepError(f"{path}: cannot load datasets directory: {e}") from None
    splits = sorted(ds.items()) if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    units = []
    for name, split in splits:
        for start in range(0, split.num_rows, _HF_ROWS_PER_UNIT):
            units.append(Unit(path, "hf", start, min(start + _HF_ROWS_PER_UNIT, split.num_rows), name))
    return units


def _counting_handler(stats: ReadStats):
    def handler(err: UnicodeDecodeError):
        stats.invalid_utf8 += 1
        return "\ufffd", err.end

    return handler


_handler_seq = 0


def _open_text(path: str, stats: ReadStats):
    """Open as UTF-8 text (BOM dropped, CR/CRLF normalised); bad bytes become U+FFFD and are counted."""
    global _handler_seq
    _handler_seq += 1
    name = f"data_prep_count_{os.getpid()}_{_handler_seq}"
    codecs.register_error(name, _counting_handler(stats))
    opener = _COMPRESSED.get(Path(path).suffix.lower())
    raw = opener(path, "rb") if opener else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors=name, newline=None)


def _lines(f, path: str, stats: ReadStats, max_line_chars: int) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without newline, continues-previous) with over-long lines cut in pieces."""
    lineno = 0
    cont = False
    while True:
        line = f.readline(max_line_chars)
        if not line:
            return
        if not cont:
            lineno += 1
        ended = line.endswith("\n")
        if not ended and len(line) >= max_line_chars and not cont:
            stats.long_lines += 1
            stats.warn(f"{path}:{lineno}: line longer than {max_line_chars} characters, read in pieces")
        yield lineno, line.rstrip("\n"), cont
        cont = not ended


class _DocBuilder:
    """Collects paragraphs; cuts documents that outgrow max_doc_chars so memory stays bounded."""

    def __init__(self, stats: ReadStats, max_doc_chars: int, min_doc_chars: int):
        self.stats, self.max, self.min = stats, max_doc_chars, min_doc_chars
        self.paras: list[str] = []
        self.chars = 0
        self.was_split = False

    def add(self, para: str) -> list[str] | None:
        para = para.strip()
        if not para:
            return None
        self.paras.append(para)
        self.chars += len(para)
        if self.chars >= self.max:
            self.stats.split_documents += 1
            self.was_split = True
            return self._take(check_min=False)
        return None

    def end(self, stub: bool = False) -> list[str] | None:
        """Close the current document; ``stub``: an empty one counts as a short document (a
        WikiExtractor block with only its title)."""
        if stub and not self.paras and not self.was_split:
            self.stats.short_documents += 1
        doc = self._take(check_min=not self.was_split)
        self.was_split = False
        return doc

    def _take(self, check_min: bool) -> list[str] | None:
        paras, chars = self.paras, self.chars
        self.paras, self.chars = [], 0
        if not paras:
            return None
        if check_min and chars < self.min:
            self.stats.short_documents += 1
            return None
        self.stats.documents += 1
        return paras


def iter_documents(unit: Unit, stats: ReadStats, *, min_doc_chars: int | None = None,
                   max_doc_chars: int = 4_000_000, max_line_chars: int = 1_000_000,
                   text_key: str = "text") -> Iterator[list[str]]:
    """Yield the documents of one unit as lists of paragraphs."""
    if min_doc_chars is None:
        min_doc_chars = 200 if unit.fmt == "wiki" else 0  # WikiExtractor output is ~64% title-only stubs
    b = _DocBuilder(stats, max_doc_chars, min_doc_chars)
    if unit.fmt == "hf":
        yield from _iter_hf(unit, b, text_key)
        return
    with _open_text(unit.path, stats) as f:
        lines = _lines(f, unit.path, stats, max_line_chars)
        if unit.fmt == "text":
            for _, line, _ in lines:
                doc = b.add(line) if line.strip() else b.end()
                if doc:
                    yield doc
        elif unit.fmt == "wiki":
            in_doc = title_pending = False
            for _, line, cont in lines:
                s = line.strip()
                if not cont and s.startswith("<doc ") and s.endswith(">"):
                    if in_doc and (doc := b.end(stub=True)):  # a block without </doc>
                        yield doc
                    in_doc, title_pending = True, True
                elif not cont and s == "</doc>":
                    if doc := b.end(stub=True):
                        yield doc
                    in_doc = False
                elif in_doc and s:
                    if title_pending:  # the first line of a block repeats the title
                        title_pending = False
                        continue
                    if doc := b.add(html.unescape(s)):
                        yield doc
        elif unit.fmt == "gutenberg":
            yield from _iter_gutenberg(unit, lines, b, stats)
        elif unit.fmt == "jsonl":
            yield from _iter_jsonl(unit, f, b, stats, text_key)
        else:
            raise DataPrepError(f"{unit.path}: unknown format {unit.fmt!r}")
        if doc := b.end():
            yield doc


def _iter_gutenberg(unit: Unit, lines, b: _DocBuilder, stats: ReadStats):
    # Only strip a header if a START marker exists near the top; otherwise keep the whole text.
    head = _head(unit.path, 1 << 20).decode("utf-8", errors="replace")
    started = not any(_GUTENBERG_START.match(x) for x in head.splitlines())
    if started:
        stats.warn(f"{unit.path}: no Project Gutenberg START marker in the first MiB; kept the whole file")
    para: list[str] = []
    for _, line, _ in lines:
        if not started:
            started = bool(_GUTENBERG_START.match(line))
            continue
        if _GUTENBERG_END.match(line):
            break
        if line.strip():
            para.append(line.strip())
        elif para:  # wrapped lines of one paragraph are joined; a blank line ends it
            if doc := b.add(" ".join(para)):
                yield doc
            para = []
    if para and (doc := b.add(" ".join(para))):
        yield doc


def _iter_jsonl(unit: Unit, f, b: _DocBuilder, stats: ReadStats, key: str):
    for lineno, line in enumerate(f, 1):  # a JSON record must be parsed whole, so no line cap here
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            stats.bad_records += 1
            stats.warn(f"{unit.path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); record skipped")
            continue
        text = rec.get(key) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            stats.bad_records += 1
            what = "has no" if not isinstance(rec, dict) or key not in rec else "has a non-string"
            stats.warn(f"{unit.path}:{lineno}: record {what} {key!r} field; record skipped")
            continue
        yield from _text_documents(b, text)


def _text_documents(b: "_DocBuilder", text: str):
    """Documents of one record's text (a record is one document; lines are paragraphs)."""
    for para in text.split("\n"):
        if doc := b.add(para):
            yield doc
    if doc := b.end():
        yield doc


def _iter_hf(unit: Unit, b: _DocBuilder, key: str):
    import datasets

    ds = datasets.load_from_disk(unit.path)
    if unit.split:
        ds = ds[unit.split]
    if key not in ds.column_names:
        raise DataPrepError(f"{unit.path}: no column {key!r} (columns: {', '.join(ds.column_names)}); "
                            f"pass --text-key")
    for start in range(unit.start, unit.stop, 1000):
        for text in ds[start:min(start + 1000, unit.stop)][key]:
            if not isinstance(text, str):
                b.stats.bad_records += 1
                continue
            yield from _text_documents(b, text)
