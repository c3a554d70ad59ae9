"""WordPiece vocabularies: train one with `tokenizers`, or load and check an existing one."""
from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import atomic_path
from .readers import DataPrepError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class Vocab:
    """What the build needs from a vocabulary, in a picklable form for worker processes."""

    tokenizer_json: str  # a `tokenizers.Tokenizer` serialised, truncation and padding removed
    tokens: list[str]
    lowercase: bool
    sha256: str
    source: str

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self.tokens.index(token)

    @property
    def special_ids(self) -> dict[str, int]:
        return {t: self.tokens.index(t) for t in SPECIAL_TOKENS}

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)


def _read_vocab_txt(path: Path) -> list[str]:
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{path}: not UTF-8 text (byte {e.start})") from None
    while tokens and tokens[-1] == "":
        tokens.pop()
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens, 1):
        if not t.strip():
            raise DataPrepError(f"{path}:{i}: empty token")
        if t in seen:
            raise DataPrepError(f"{path}:{i}: duplicate token {t!r} (first on line {seen[t]})")
        seen[t] = i
    missing = [t for t in SPECIAL_TOKENS if t not in seen]
    if missing:
        raise DataPrepError(f"{path}: missing special token(s) {', '.join(missing)}")
    return tokens


def load_vocab(path: str | Path, lowercase: bool | None = None) -> Vocab:
    """Load `vocab.txt` or a tokenizer directory (vocab.txt, optionally tokenizer.json and
    tokenizer_config.json). Casing comes from the directory's config unless given."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    p = Path(path)
    if not p.exists():
        raise DataPrepError(f"vocab {str(p)!r}: no such file or directory")
    vocab_txt = p / "vocab.txt" if p.is_dir() else p
    if not vocab_txt.is_file():
        raise DataPrepError(f"{p}: no vocab.txt in this directory")
    tokens = _read_vocab_txt(vocab_txt)
    explicit_case = lowercase is not None
    cfg_file = vocab_txt.parent / "tokenizer_config.json"
    if lowercase is None and cfg_file.is_file():
        try:
            lowercase = bool(json.loads(cfg_file.read_text()).get("do_lower_case", True))
        except json.JSONDecodeError as e:
            raise DataPrepError(f"{cfg_file}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if lowercase is None:  # a bare vocab.txt: an uncased vocab has no upper-case word pieces
        lowercase = not any(t.isalpha() and t != t.lower() for t in tokens if not t.startswith("["))
    tok_json = vocab_txt.parent / "tokenizer.json"
    if tok_json.is_file() and p.is_dir() and not explicit_case:  # an explicit --cased overrides the file
        try:
            tok = Tokenizer.from_file(str(tok_json))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
            raise DataPrepError(f"{tok_json}: not a readable tokenizer ({str(e)[:160]}); fix or delete it to use "
                                f"{vocab_txt.name} alone") from None
        if tok.get_vocab_size() != len(tokens):
            raise DataPrepError(f"{tok_json}: {tok.get_vocab_size()} tokens but vocab.txt has {len(tokens)}")
    else:
        tok = BertWordPieceTokenizer(str(vocab_txt), lowercase=lowercase)._tokenizer
    tok.no_truncation()  # some published tokenizer.json files truncate at 128 or 512
    tok.no_padding()
    digest = hashlib.sha256(("\n".join(tokens) + f"\nlowercase={lowercase}").encode()).hexdigest()
    return Vocab(tok.to_str(), tokens, bool(lowercase), digest, str(p))


# BERT's WordPiece turns a longer word into [UNK] (transformers' max_input_chars_per_word), so such a
# word cannot contribute a piece; the trainer never sees it. (Each merge rewrites every word holding
# the pair, so one 5 MB "word" made training quadratic in its length.)
MAX_WORD_CHARS = 100


def count_words(texts: Iterable[str], lowercase: bool = True) -> Counter[str]:
    """How often each word occurs, split as BERT's tokenizer splits: normalized (cleaned, Chinese
    characters isolated, lower-cased and accents stripped unless cased), then cut at white space and
    punctuation. Words longer than ``MAX_WORD_CHARS`` are left out."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm = BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    split = BertPreTokenizer()
    chunks: Counter[str] = Counter()  # white-space separated: counted at C speed
    for text in texts:
        found = norm.normalize_str(text).split()
        if max(map(len, found), default=0) > MAX_WORD_CHARS:  # rare: cut now so no long chunk is kept
            found = [w for w, _ in split.pre_tokenize_str(" ".join(found)) if len(w) <= MAX_WORD_CHARS]
        chunks.update(found)
    counts: Counter[str] = Counter()
    for chunk, n in chunks.items():  # then each distinct chunk cut at punctuation
        for word, _ in split.pre_tokenize_str(chunk):
            if len(word) <= MAX_WORD_CHARS:
                counts[word] += n
    return counts


def train_vocab(texts: Iterable[str], output: str | Path, vocab_size: int = 30522, lowercase: bool = True,
                min_frequency: int = 2, limit_alphabet: int = 1000) -> Vocab:
    """Train a BERT WordPiece vocab and write a directory `BertTokenizerFast.from_pretrained` loads.

    The same texts give the same vocab.txt, byte for byte. `tokenizers`' trainer alone does not: it
    numbers the "##c" pieces in hash-map order and breaks count ties between merges (and at the
    alphabet's limit) by those numbers. So the words are counted here, the alphabet is chosen here
    (ties by character), the alphabet and the "##c" pieces are numbered up front, and the trainer only
    merges the counted words.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    counts = count_words(texts, lowercase)
    if not counts:  # e.g. one long line without spaces: its only "word" is over MAX_WORD_CHARS
        raise DataPrepError(f"vocab: the input holds no word of at most {MAX_WORD_CHARS} characters to train on")
    alphabet: Counter[str] = Counter()
    later: set[str] = set()  # characters after a word's first: the trainer adds "##c" for those it keeps
    for word, n in counts.items():
        later.update(word[1:])
        for c in word:
            alphabet[c] += n
    kept = sorted(sorted(alphabet, key=lambda c: (-alphabet[c], c))[:limit_alphabet])
    continuing = ["##" + c for c in kept if c in later]
    # Given as special tokens, the alphabet and the "##c" pieces take the ids after [PAD]..[MASK] in this
    # order (the order the trainer's own vocab has, with the "##c" pieces sorted); its alphabet is exactly
    # `kept` (each initial character counts as most frequent, and nothing else is kept).
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=True, continuing_subword_prefix="##",
        special_tokens=[*SPECIAL_TOKENS, *kept, *continuing], initial_alphabet=kept, limit_alphabet=len(kept))
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=MAX_WORD_CHARS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the words come normalized and split already

    def repeated(batch_chars: int = 1 << 20) -> Iterator[str]:  # each word as often as it was counted
        batch: list[str] = []
        size = 0
        for word, n in counts.items():
            per_piece = max(1, batch_chars // (len(word) + 1))  # "the" 10^8 times: in pieces, not one string
            while n > 0:
                k = min(n, per_piece)
                n -= k
                batch.append((word + " ") * k)
                size += k * (len(word) + 1)
                if size >= batch_chars:
                    yield "".join(batch)
                    batch, size = [], 0
        if batch:
            yield "".join(batch)

    _train_interruptibly(tok, repeated(), trainer)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    save_dir(tokens, lowercase, output)
    return load_vocab(output)


def _train_interruptibly(tok, texts: Iterator[str], trainer) -> None:
    """Run the trainer in a thread: its Rust merge loop does not return to Python for minutes on a
    large corpus, and Python only runs a signal handler (Ctrl-C, SIGTERM -> KeyboardInterrupt) in the
    main thread between bytecodes; waiting here on the thread keeps the main thread able to stop."""
    failure: list[BaseException] = []

    def work() -> None:
        try:
            tok.train_from_iterator(texts, trainer=trainer)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            failure.append(e)

    t = threading.Thread(target=work, name="wordpiece-trainer", daemon=True)  # daemon: exit need not wait
    t.start()
    t.join()  # interrupted by a signal on POSIX: the KeyboardInterrupt leaves the thread behind
    if failure:
        raise failure[0]


def save_dir(tokens: list[str], lowercase: bool, out: str | Path) -> None:
    """Write vocab.txt plus the files `BertTokenizerFast.from_pretrained` loads (transformers 4 or 5)."""
    import inspect

    from transformers import BertTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "vocab.txt") as tmp:  # vocab.txt last: its presence means the directory is whole
        tmp.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        # transformers 5 renamed the constructor's vocab_file argument to vocab
        arg = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab"
        hf = BertTokenizerFast(**{arg: str(tmp)}, do_lower_case=lowercase, strip_accents=None if lowercase else False)
        hf.save_pretrained(str(out))


def describe(v: Vocab) -> str:
    ids = v.special_ids
    return (f"{v.source}: {v.size} tokens, {'uncased' if v.lowercase else 'cased'}, "
            + ", ".join(f"{t}={i}" for t, i in ids.items()) + f", sha256 {v.sha256[:16]}")
