"""SQuAD questions -> fixed-length model inputs, and span logits -> answer text.

Windows follow the BERT recipe: ``[CLS] question [SEP] context-window [SEP]`` with the question cut
to ``max_query_length`` tokens and the context covered by windows whose starts are ``doc_stride``
tokens apart (BERT's meaning of the flag; the tokenizer's own ``stride`` argument is the overlap,
so it is derived per question length). Answers are found back in the original context through the
fast tokenizer's character offsets, so the predicted text is an exact substring of the context.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from finetune.data import Example, Skips

# Skip/count reasons, named once so logs and tests agree.
EMPTY_CONTEXT = "empty context"
EMPTY_QUESTION = "empty question"
NO_ANSWER = "no answer given and not marked is_impossible"
BAD_START = "answer_start does not match the answer text"
OUTSIDE = "answer outside the context"
NOT_IN_ANY_WINDOW = "answer not wholly inside any window (all its windows trained on [CLS])"
WINDOW_WITHOUT_ANSWER = "windows not containing the answer (trained on [CLS])"


@dataclass
class Features:
    """Column arrays, one row per window, plus what postprocessing needs to go back to text."""
    inputs: dict[str, np.ndarray]            # input_ids, attention_mask[, token_type_ids]
    example_index: np.ndarray                 # row -> index into ``examples``
    offsets: np.ndarray                       # (rows, seq, 2) char span; -1 outside the context
    max_context: np.ndarray                   # (rows, seq) bool: this window is the token's best
    start_positions: np.ndarray | None = None
    end_positions: np.ndarray | None = None
    examples: list[Example] = field(default_factory=list)

    def __len__(self):
        return len(self.example_index)


def _truncate_questions(tokenizer, questions: list[str], max_query_length: int) -> list[str]:
    """Cut each question after its ``max_query_length``-th token (character offsets, no re-join)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offs in zip(questions, enc["offset_mapping"]):
        out.append(q[:offs[max_query_length - 1][1]] if len(offs) > max_query_length else q)
    return out


def build_features(examples: list[Example], tokenizer, *, max_seq_length: int = 384,
                   doc_stride: int = 128, max_query_length: int = 64, training: bool,
                   version_2: bool = False, skips: Skips | None = None) -> Features:
    """Tokenize into windows. Questions that cannot be used are skipped and counted in ``skips``.

    For training each window is labelled with the answer's token span, or with [CLS] (position 0)
    when the answer is not wholly inside it or the question has no answer (SQuAD 2.0).
    """
    skips = skips if skips is not None else Skips()
    if max_seq_length < max_query_length + 4:
        raise ValueError(f"--max-seq-length {max_seq_length} leaves no room for the context after "
                         f"a {max_query_length}-token question")
    kept: list[Example] = []
    for ex in examples:
        if not ex.context.strip():
            skips.add(EMPTY_CONTEXT, ex.qid)
        elif not ex.question.strip():
            skips.add(EMPTY_QUESTION, ex.qid)
        elif training and not ex.is_impossible:
            if not ex.answers:
                skips.add(NO_ANSWER, ex.qid)
                continue
            s, text = ex.answer_starts[0], ex.answers[0]
            if s < 0 or s + len(text) > len(ex.context) or not text.strip():
                skips.add(OUTSIDE, ex.qid)
            elif ex.context[s:s + len(text)] != text:
                skips.add(BAD_START, ex.qid)
            else:
                kept.append(ex)
        else:
            kept.append(ex)

    if not kept:
        raise ValueError(f"no usable question among {len(examples)} (skipped: {skips.describe()})")
    # Leading white space in some questions would only waste query tokens.
    questions = _truncate_questions(tokenizer, [ex.question.lstrip() for ex in kept], max_query_length)
    qlens = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    n_special = tokenizer.num_special_tokens_to_add(pair=True)

    groups: dict[int, list[int]] = defaultdict(list)  # same question length -> same overlap
    for i, n in enumerate(qlens):
        groups[n].append(i)

    rows: dict[str, list] = defaultdict(list)
    for qlen in sorted(groups):
        idx = groups[qlen]
        budget = max_seq_length - qlen - n_special  # context tokens per window
        overlap = max(0, budget - doc_stride)
        enc = tokenizer([questions[i] for i in idx], [kept[i].context for i in idx],
                        truncation="only_second", max_length=max_seq_length, stride=overlap,
                        return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding="max_length")
        for r, local in enumerate(enc["overflow_to_sample_mapping"]):
            seq_ids = enc.sequence_ids(r)
            offs = np.array([o if sid == 1 else (-1, -1)
                             for o, sid in zip(enc["offset_mapping"][r], seq_ids)], dtype=np.int32)
            rows["example_index"].append(idx[local])
            rows["offsets"].append(offs)
            for key in tokenizer.model_input_names:
                if key in enc:
                    rows[key].append(enc[key][r])

    n_rows = len(rows["example_index"])
    order = np.argsort(np.array(rows["example_index"], dtype=np.int64), kind="stable")
    example_index = np.array(rows["example_index"], dtype=np.int64)[order]
    offsets = np.stack(rows["offsets"])[order] if n_rows else np.zeros((0, max_seq_length, 2), np.int32)
    inputs = {k: np.array(rows[k], dtype=np.int64)[order] for k in tokenizer.model_input_names
              if rows.get(k)}
    max_context = _max_context(example_index, offsets)

    feats = Features(inputs, example_index, offsets, max_context, examples=kept)
    if training:
        feats.start_positions, feats.end_positions = _label(feats, skips)
    return feats


def _max_context(example_index: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For tokens seen in several windows, mark the window where it has most context on both sides
    (BERT's ``_check_is_max_context``: score = min(left, right) + 0.01 * window length)."""
    out = np.zeros(offsets.shape[:2], dtype=bool)
    best: dict[tuple[int, int, int], tuple[float, int, int]] = {}
    for r in range(len(example_index)):
        pos = np.nonzero(offsets[r, :, 0] >= 0)[0]
        n = len(pos)
        for k, p in enumerate(pos):
            score = min(k, n - 1 - k) + 0.01 * n
            key = (int(example_index[r]), int(offsets[r, p, 0]), int(offsets[r, p, 1]))
            if key not in best or score > best[key][0]:
                best[key] = (score, r, int(p))
    for _, r, p in best.values():
        out[r, p] = True
    return out


def _label(feats: Features, skips: Skips) -> tuple[np.ndarray, np.ndarray]:
    starts = np.zeros(len(feats), dtype=np.int64)
    ends = np.zeros(len(feats), dtype=np.int64)
    found = set()
    for r, ei in enumerate(feats.example_index):
        ex = feats.examples[ei]
        if ex.is_impossible or not ex.answers:
            continue
        a0 = ex.answer_starts[0]
        a1 = a0 + len(ex.answers[0])
        offs = feats.offsets[r]
        ctx = np.nonzero(offs[:, 0] >= 0)[0]
        if len(ctx) == 0 or offs[ctx[0], 0] > a0 or offs[ctx[-1], 1] < a1:
            skips.add(WINDOW_WITHOUT_ANSWER, ex.qid)
            continue
        # First token ending after the answer starts; last token starting before it ends.
        starts[r] = ctx[np.argmax(offs[ctx, 1] > a0)]
        ends[r] = ctx[len(ctx) - 1 - np.argmax(offs[ctx[::-1], 0] < a1)]
        found.add(ei)
    for ei, ex in enumerate(feats.examples):
        if not ex.is_impossible and ex.answers and ei not in found:
            skips.add(NOT_IN_ANY_WINDOW, ex.qid)
    return starts, ends


@dataclass
class Prediction:
    text: str                 # best non-empty answer ("" when no valid span exists)
    null_diff: float          # null score minus best span score (SQuAD 2.0 threshold compares this)
    nbest: list[dict]


def postprocess(feats: Features, start_logits: np.ndarray, end_logits: np.ndarray, *,
                n_best_size: int = 20, max_answer_length: int = 30,
                version_2: bool = False) -> dict[str, Prediction]:
    """Best spans per question across its windows, mapped back to context characters."""
    by_example: dict[int, list[int]] = defaultdict(list)
    for r, ei in enumerate(feats.example_index):
        by_example[int(ei)].append(r)
    out: dict[str, Prediction] = {}
    for ei, rows in by_example.items():
        ex = feats.examples[ei]
        cands = []
        null_score = np.inf
        for r in rows:
            s_log, e_log, offs = start_logits[r], end_logits[r], feats.offsets[r]
            null_score = min(null_score, float(s_log[0] + e_log[0]))
            top_s = np.argsort(s_log)[::-1][:n_best_size]
            top_e = np.argsort(e_log)[::-1][:n_best_size]
            for s in top_s:
                if offs[s, 0] < 0 or not feats.max_context[r, s]:
                    continue
                for e in top_e:
                    if offs[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                        continue
                    cands.append((float(s_log[s] + e_log[e]), float(s_log[s]), float(e_log[e]),
                                  int(offs[s, 0]), int(offs[e, 1])))
        cands.sort(key=lambda c: c[0], reverse=True)
        nbest, seen = [], set()
        for score, sl, el, c0, c1 in cands:
            text = ex.context[c0:c1]
            if text in seen:  # the same text from overlapping windows: keep its best score
                continue
            seen.add(text)
            nbest.append({"text": text, "start_logit": sl, "end_logit": el, "score": score,
                          "start_char": c0, "end_char": c1})
            if len(nbest) >= n_best_size:
                break
        best_score = nbest[0]["score"] if nbest else -np.inf
        if version_2:
            nbest.append({"text": "", "start_logit": None, "end_logit": None,
                          "score": null_score, "start_char": -1, "end_char": -1})
            nbest.sort(key=lambda c: c["score"], reverse=True)
            nbest = nbest[:n_best_size]
        if not nbest:
            nbest = [{"text": "", "start_logit": None, "end_logit": None, "score": 0.0,
                      "start_char": -1, "end_char": -1}]
        scores = np.array([c["score"] for c in nbest], dtype=np.float64)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for c, p in zip(nbest, probs):
            c["probability"] = float(p)
        best_text = next((c["text"] for c in nbest if c["text"]), "")
        diff = null_score - best_score if np.isfinite(best_score) else np.inf
        out[ex.qid] = Prediction(best_text, float(diff), nbest)
    return out
