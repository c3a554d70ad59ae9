"""BERT sample construction and masking, as pure functions of token arrays and an RNG.

The pairing follows the original BERT recipe (Devlin et al., create_pretraining_data): fill a chunk
of whole sentences up to a target length (shorter with probability short_seq_prob), cut it into
segment A and B, and for the next-sentence task replace B by text from a random other document half
of the time; sentence-order prediction (ALBERT) swaps A and B instead. Masking is shared by the
build (static masks) and the reader (dynamic masks), so both give the same distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

DEFAULT_MAX_PREDICTIONS = {128: 20, 512: 80}  # NVIDIA's and Google's recipes


def default_max_predictions(seq_len: int, mask_prob: float = 0.15) -> int:
    return DEFAULT_MAX_PREDICTIONS.get(seq_len, int(np.ceil(seq_len * mask_prob)))


def truncate_pair(la: int, lb: int, max_tokens: int) -> tuple[int, int]:
    """Lengths after BERT's truncation (trim the longer segment one token at a time, B on ties),
    in closed form so a 50k-token sentence costs nothing."""
    excess = la + lb - max_tokens
    if excess <= 0:
        return la, lb
    longer_is_a = la > lb
    hi, lo = max(la, lb), min(la, lb)
    if hi - excess >= lo:
        hi -= excess
        return (hi, lo) if longer_is_a else (lo, hi)
    return (max_tokens + 1) // 2, max_tokens // 2


def _trim(seg: np.ndarray, keep: int, rng: np.random.Generator) -> np.ndarray:
    drop = len(seg) - keep
    if drop <= 0:
        return seg
    front = int(rng.binomial(drop, 0.5))  # each removed token came from the front or back at random
    return seg[front:front + keep]


@dataclass
class PairOptions:
    seq_len: int
    pair_task: str = "nsp"  # "nsp" | "sop"
    short_seq_prob: float = 0.1


def document_pairs(sents: list[np.ndarray], rng: np.random.Generator, opt: PairOptions,
                   random_doc: Callable[[np.random.Generator], list[np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (segment A, segment B, label) for one document; label 1 = B is random (NSP) or the
    segments are swapped (SOP), 0 = B really follows A."""
    max_tokens = opt.seq_len - 3  # [CLS] A [SEP] B [SEP]
    target = max_tokens
    if rng.random() < opt.short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    chunk: list[np.ndarray] = []
    length = 0
    i = 0
    while i < len(sents):
        chunk.append(sents[i])
        length += len(sents[i])
        if i == len(sents) - 1 or length >= target:
            a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
            label = 0
            if opt.pair_task == "nsp":
                a = np.concatenate(chunk[:a_end])
                if len(chunk) == 1 or rng.random() < 0.5:
                    label = 1
                    want = max(1, target - len(a))
                    other = random_doc(rng)
                    start = int(rng.integers(0, len(other)))
                    parts, got = [], 0
                    for j in range(start, len(other)):
                        s = other[j]
                        parts.append(s)
                        got += len(s)
                        if got >= want:
                            break
                    b = np.concatenate(parts)
                    i -= len(chunk) - a_end  # the unused sentences start the next chunk
                else:
                    b = np.concatenate(chunk[a_end:])
            else:
                if len(chunk) == 1:  # one long sentence: cut it, so both segments are real text
                    whole = chunk[0]
                    if len(whole) < 2:
                        chunk, length, i = [], 0, i + 1
                        continue
                    cut = int(rng.integers(1, len(whole)))
                    a, b = whole[:cut], whole[cut:]
                else:
                    a, b = np.concatenate(chunk[:a_end]), np.concatenate(chunk[a_end:])
                if rng.random() < 0.5:
                    a, b, label = b, a, 1
            ka, kb = truncate_pair(len(a), len(b), max_tokens)
            a, b = _trim(a, ka, rng), _trim(b, kb, rng)
            if len(a) >= 1 and len(b) >= 1:
                yield a, b, label
            chunk, length = [], 0
            # Unlike the original, the target is drawn again for every chunk: with a whole book as
            # one document, a per-document draw would make 10% of books entirely short samples.
            target = max_tokens
            if rng.random() < opt.short_seq_prob:
                target = int(rng.integers(2, max_tokens + 1))
        i += 1


@dataclass
class MaskSpec:
    """Vocabulary facts masking needs (arrays indexed by token id)."""

    special: np.ndarray  # bool: never masked, never a random replacement
    continuation: np.ndarray  # bool: a "##" piece (for whole-word masking)
    mask_id: int
    mask_prob: float = 0.15
    max_predictions: int = 20
    whole_word: bool = False

    @classmethod
    def from_tokens(cls, tokens: list[str], mask_id: int, special_ids, **kw) -> "MaskSpec":
        special = np.zeros(len(tokens), bool)
        special[list(special_ids)] = True
        cont = np.fromiter((t.startswith("##") for t in tokens), bool, len(tokens))
        return cls(special, cont, mask_id, **kw)

    def __post_init__(self):
        self.replacements = np.flatnonzero(~self.special)


def mask_sample(tokens: np.ndarray, rng: np.random.Generator, spec: MaskSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose ~mask_prob of the non-special positions (at most max_predictions, at least one); of
    those 80% become [MASK], 10% a random token, 10% stay. Returns (masked tokens, sorted
    positions, original ids at those positions)."""
    cand = np.flatnonzero(~spec.special[tokens])
    if len(cand) == 0:
        return tokens.copy(), np.zeros(0, np.int64), np.zeros(0, tokens.dtype)
    n = min(spec.max_predictions, max(1, int(round(len(cand) * spec.mask_prob))))
    if spec.whole_word:
        # a word = a non-continuation piece plus the "##" pieces right after it
        starts = ~spec.continuation[tokens[cand]]
        starts[1:] |= np.diff(cand) != 1
        starts[0] = True
        group = np.cumsum(starts) - 1
        sizes = np.bincount(group)
        chosen = np.zeros(len(sizes), bool)
        count = 0
        for g in rng.permutation(len(sizes)):
            if count + sizes[g] <= n:
                chosen[g] = True
                count += sizes[g]
                if count == n:
                    break
        positions = cand[chosen[group]]
    else:
        positions = np.sort(rng.choice(cand, n, replace=False))
    labels = tokens[positions].copy()
    out = tokens.copy()
    r = rng.random(len(positions))
    random_ids = spec.replacements[rng.integers(0, len(spec.replacements), len(positions))]
    out[positions[r < 0.8]] = spec.mask_id
    rnd = (r >= 0.8) & (r < 0.9)
    out[positions[rnd]] = random_ids[rnd]
    return out, positions, labels
