"""The SQuAD metric: exact match and token F1, following the rules of the official scripts.

Rules (v1.1): both strings are normalized (lower case; every ASCII punctuation character
removed; the words a/an/the removed; runs of white space collapsed). Exact match is equality of
the normalized strings; F1 is the harmonic mean of precision and recall of the bag of
normalized tokens, 0 when no token is shared. A question scores the best value over its
reference answers; the figures are averaged over every question of the data file, so a question
missing from the predictions scores 0 (and is reported).

SQuAD 2.0 differs only for empty strings: an empty normalized reference list becomes [""], and
when either side has no token F1 is 1 if both are empty, else 0. Its figures are split into
HasAns (questions with an answer) and NoAns. The official v2.0 script drops missing predictions
from the average; here they count 0 in both versions, which is identical when none is missing.

    python -m finetune.evaluate DATA.json PREDICTIONS.json [--na-prob-file NA.json]

The last line printed is a JSON object with ``exact_match`` and ``f1`` (percentages).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import string
import sys
from collections import Counter
from pathlib import Path

from finetune.data import Example, SquadFormatError, load_json, read_squad

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse white space (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str, version_2: bool = False) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if version_2 and (not pred or not ref):
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def references(example: Example, version_2: bool) -> list[str]:
    """Reference texts as the official script of that version sees them."""
    if not version_2:
        return list(example.answers)
    refs = [a for a in example.answers if normalize_answer(a)]
    return refs or [""]


def score_question(prediction: str, example: Example, version_2: bool) -> tuple[float, float]:
    """(exact, f1) of one prediction: the best over the references."""
    refs = references(example, version_2)
    if not refs:  # a v1 question without answers: nothing can match
        return 0.0, 0.0
    return (max(exact_match(prediction, r) for r in refs),
            max(f1_score(prediction, r, version_2) for r in refs))


def has_answer(example: Example) -> bool:
    return bool(example.answers) and not example.is_impossible


def evaluate(examples: list[Example], predictions: dict[str, str], version_2: bool) -> dict:
    """Percentages over all questions; v2 adds HasAns_/NoAns_ figures. Lists missing ids."""
    per_q: dict[str, tuple[float, float]] = {}
    missing = []
    for ex in examples:
        if ex.qid in predictions:
            per_q[ex.qid] = score_question(predictions[ex.qid], ex, version_2)
        else:
            missing.append(ex.qid)
            per_q[ex.qid] = (0.0, 0.0)

    def summary(exs, prefix=""):
        n = len(exs)
        return {f"{prefix}exact_match" if not prefix else f"{prefix}exact":
                100.0 * sum(per_q[e.qid][0] for e in exs) / n if n else 0.0,
                f"{prefix}f1": 100.0 * sum(per_q[e.qid][1] for e in exs) / n if n else 0.0,
                f"{prefix}total": n}

    out = summary(examples)
    if version_2:
        out.update(summary([e for e in examples if has_answer(e)], "HasAns_"))
        out.update(summary([e for e in examples if not has_answer(e)], "NoAns_"))
    out["missing"] = len(missing)
    out["missing_ids"] = missing[:20]
    return out


def best_null_threshold(examples: list[Example], answers: dict[str, str],
                        null_diffs: dict[str, float]) -> dict:
    """Choose the no-answer threshold on these predictions (SQuAD 2.0).

    ``answers`` holds each question's best non-empty answer and ``null_diffs`` the null score minus
    that answer's score; a question is predicted empty when its diff exceeds the threshold. Every
    candidate threshold (each diff, plus "never null") is tried and the F1-best one kept; the
    exact match at that threshold is reported with it.
    """
    scored = []
    for ex in examples:
        if ex.qid not in answers:
            continue
        em_ans, f1_ans = score_question(answers[ex.qid], ex, True)
        em_null, f1_null = score_question("", ex, True)
        # a question without a diff is never made null
        scored.append((null_diffs.get(ex.qid, -math.inf), em_ans, f1_ans, em_null, f1_null))
    n = len(examples)  # missing questions count 0, as in evaluate()
    if not scored:
        return {"threshold": 0.0, "exact_match": 0.0, "f1": 0.0}
    scored.sort(key=lambda s: s[0])
    # Threshold above every diff: nothing is null. Lowering it past a diff turns that question null.
    em = sum(s[1] for s in scored)
    f1 = sum(s[2] for s in scored)
    finite = [s[0] for s in scored if math.isfinite(s[0])]
    best = (f1, em, max(finite) + 1.0 if finite else 0.0)
    for i in range(len(scored) - 1, -1, -1):
        d, em_a, f1_a, em_n, f1_n = scored[i]
        em += em_n - em_a
        f1 += f1_n - f1_a
        if i > 0 and scored[i - 1][0] == d:
            continue  # ties switch together
        thresh = scored[i - 1][0] if i > 0 else d - 1.0
        if f1 > best[0]:
            best = (f1, em, thresh)
    thresh = best[2]
    if not math.isfinite(thresh):  # only when every diff is infinite on that side
        thresh = (min(finite) - 1.0 if thresh < 0 else max(finite) + 1.0) if finite else 0.0
    return {"threshold": float(thresh), "exact_match": 100.0 * best[1] / n,
            "f1": 100.0 * best[0] / n}


def read_predictions(path: str | Path) -> dict[str, str]:
    path = Path(path)
    preds = load_json(path)
    if not isinstance(preds, dict):
        raise SquadFormatError(f"{path}: predictions should be a JSON object mapping question id "
                               f"to answer text, got {type(preds).__name__}")
    for qid, text in preds.items():
        if not isinstance(text, str):
            raise SquadFormatError(f"{path}: prediction for '{qid}' should be a string, "
                                   f"got {type(text).__name__}")
    return preds


def read_predictions_na(path) -> dict[str, float]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SquadFormatError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) or v is None
                                            for v in raw.values()):
        raise SquadFormatError(f"{path}: should map question id -> number")
    # None: no valid span at all, so the question is null at any threshold
    return {k: float("inf") if v is None else float(v) for k, v in raw.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="SQuAD v1.1 or v2.0 data file (with reference answers)")
    ap.add_argument("predictions", help="JSON object: question id -> predicted answer text")
    ap.add_argument("--na-prob-file", help="v2 only: JSON id -> null-score diff; also report the "
                    "best threshold (predictions must then hold the best non-empty answers)")
    args = ap.parse_args(argv)
    try:
        data = read_squad(args.data)
        preds = read_predictions(args.predictions)
        null_diffs = read_predictions_na(args.na_prob_file) if args.na_prob_file else None
    except SquadFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = evaluate(data.examples, preds, data.version_2)
    known = {e.qid for e in data.examples}
    extra = [q for q in preds if q not in known]
    for qid in result["missing_ids"]:
        print(f"missing prediction for question {qid}: scored 0", file=sys.stderr)
    if result["missing"] > len(result["missing_ids"]):
        print(f"... {result['missing'] - len(result['missing_ids'])} more missing", file=sys.stderr)
    if extra:
        print(f"{len(extra)} predictions for ids not in {args.data} ignored (e.g. {extra[0]})",
              file=sys.stderr)
    if null_diffs is not None:
        best = best_null_threshold(data.examples, preds, null_diffs)
        result.update({"best_exact_match": best["exact_match"], "best_f1": best["f1"],
                       "best_null_threshold": best["threshold"]})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
