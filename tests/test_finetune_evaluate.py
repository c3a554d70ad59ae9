"""The SQuAD metric: each normalization rule by hand, then the real dev file against an independent
transcription of the official rules (written here from the rules, not by calling finetune)."""
import json
import random
import string
import subprocess
import sys

import pytest

from finetune.data import Example, read_squad
from finetune.evaluate import (best_null_threshold, evaluate, exact_match, f1_score,
                               normalize_answer)


# ---------------------------------------------------------------- independent transcription
def _is_word_char(ch):  # what Python's re \w matches in a str pattern
    return ch.isalnum() or ch == "_"


def ref_normalize(s):
    s = s.lower()
    s = s.translate({ord(c): None for c in string.punctuation})
    # \b(a|an|the)\b -> " ": drop maximal runs of word characters that are exactly an article
    out, i = [], 0
    while i < len(s):
        j = i
        if _is_word_char(s[i]):
            while j < len(s) and _is_word_char(s[j]):
                j += 1
            run = s[i:j]
            out.append(" " if run in ("a", "an", "the") else run)
        else:
            while j < len(s) and not _is_word_char(s[j]):
                j += 1
            out.append(s[i:j])
        i = j
    return " ".join("".join(out).split())


def ref_f1(pred, gold, v2=False):
    p, g = ref_normalize(pred).split(), ref_normalize(gold).split()
    if v2 and (len(p) == 0 or len(g) == 0):
        return 1.0 if p == g else 0.0
    counts = {}
    for t in g:
        counts[t] = counts.get(t, 0) + 1
    same = 0
    for t in p:
        if counts.get(t, 0) > 0:
            counts[t] -= 1
            same += 1
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def ref_scores(raw_json, preds):
    """Official v1.1 evaluation loop over the raw JSON: every question counts, missing scores 0."""
    total = em = f1 = 0.0
    for article in raw_json["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                total += 1
                if qa["id"] not in preds:
                    continue
                golds = [a["text"] for a in qa["answers"]]
                em += max(float(ref_normalize(preds[qa["id"]]) == ref_normalize(g)) for g in golds)
                f1 += max(ref_f1(preds[qa["id"]], g) for g in golds)
    return 100 * em / total, 100 * f1 / total


# ---------------------------------------------------------------- normalization rules by hand
@pytest.mark.parametrize("pred, gold, expected_em", [
    ("Denver Broncos", "denver broncos", 1.0),          # lower case
    ("Broncos!", "broncos", 1.0),                       # punctuation removed
    ("U.S.", "US", 1.0),                                # ... also inside words
    ("it's", "its", 1.0),
    ("(1990)", "1990", 1.0),
    ("The Broncos", "broncos", 1.0),                    # article "the"
    ("an apple", "apple", 1.0),                         # article "an"
    ("A dog", "dog", 1.0),                              # article "a", after lower-casing
    ("theater", "ater", 0.0),                           # articles only as whole words
    ("abacus", "bacus", 0.0),
    ("  Denver\n\tBroncos ", "Denver Broncos", 1.0),    # white space collapsed
    ("1990–1995", "1990 1995", 0.0),                    # en dash is not ASCII punctuation: kept
    ("Denver", "Broncos", 0.0),
])
def test_exact_match_rules(pred, gold, expected_em):
    assert exact_match(pred, gold) == expected_em
    assert float(ref_normalize(pred) == ref_normalize(gold)) == expected_em


def test_hyphen_joins_words_not_splits():
    # punctuation is deleted, not replaced by a space: "the-end" -> "theend", no article left
    assert normalize_answer("the-end") == "theend"
    assert exact_match("the-end", "end") == 0.0


def test_article_next_to_unicode_punctuation_is_removed():
    # "–" survives punctuation removal but is not a word character, so "the" is a whole word
    assert normalize_answer("the–end") == ref_normalize("the–end") == "–end"


def test_f1_partial_overlap_formula():
    # 2 shared tokens; precision 2/3, recall 1 -> F1 0.8
    assert f1_score("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # counts are a multiset: "cat cat" vs "cat" shares one token -> P 1/2, R 1
    assert f1_score("the cat cat", "a cat") == pytest.approx(2 * 0.5 / 1.5)
    assert f1_score("dog", "cat") == 0.0


def test_empty_strings_v1_vs_v2():
    # v1.1 script: normalized both empty -> EM 1 but F1 0 (no shared token); v2.0 gives F1 1
    assert exact_match("", "the") == 1.0
    assert f1_score("", "the") == 0.0
    assert f1_score("", "the", version_2=True) == 1.0
    assert f1_score("Denver", "", version_2=True) == 0.0


def _ex(qid, answers, impossible=False):
    return Example(qid, "t", "some context", "q?", answers, [0] * len(answers), impossible)


def test_max_over_references_and_missing_counts_zero():
    exs = [_ex("q1", ["Paris", "the city of Paris"]), _ex("q2", ["1990"]), _ex("q3", ["x"])]
    res = evaluate(exs, {"q1": "City of Paris", "q2": "in 1990"}, version_2=False)
    # q1: EM 1, F1 1; q2: EM 0, F1 2*(1/2*1)/(1.5) = 2/3; q3 missing: 0 -- all over 3 questions
    assert res["exact_match"] == pytest.approx(100 / 3)
    assert res["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert res["missing"] == 1 and res["missing_ids"] == ["q3"] and res["total"] == 3


def test_v2_hasans_noans_split():
    exs = [_ex("a", ["Denver"]), _ex("b", [], impossible=True), _ex("c", [], impossible=True),
           _ex("d", ["the"])]  # a reference that normalizes empty is dropped -> [""] in v2
    res = evaluate(exs, {"a": "Denver", "b": "", "c": "something", "d": ""}, version_2=True)
    assert res["HasAns_total"] == 2 and res["NoAns_total"] == 2
    assert res["HasAns_exact"] == 100.0 and res["HasAns_f1"] == 100.0
    assert res["NoAns_exact"] == 50.0 and res["NoAns_f1"] == 50.0
    assert res["exact_match"] == 75.0 and res["f1"] == 75.0


def test_best_null_threshold_matches_brute_force():
    rng = random.Random(0)
    exs, answers, diffs = [], {}, {}
    for i in range(60):
        impossible = rng.random() < 0.4
        exs.append(_ex(f"q{i}", [] if impossible else ["red apple"], impossible))
        answers[f"q{i}"] = rng.choice(["red apple", "apple", "green pear", "red"])
        diffs[f"q{i}"] = round(rng.uniform(-3, 3), 1)  # rounding makes ties
    best = best_null_threshold(exs, answers, diffs)

    def f1_at(t):
        preds = {q: ("" if diffs[q] > t else a) for q, a in answers.items()}
        return evaluate(exs, preds, version_2=True)

    brute = max(f1_at(t)["f1"] for t in sorted(set(diffs.values())) + [-10.0, 10.0])
    assert best["f1"] == pytest.approx(brute)
    at = f1_at(best["threshold"])  # the reported threshold reproduces the reported scores
    assert at["f1"] == pytest.approx(best["f1"]) and at["exact_match"] == pytest.approx(best["exact_match"])


# ---------------------------------------------------------------- real dev file
def _prediction_table(raw, seed=0):
    """A mix a real system produces: exact, re-cased/punctuated, partial, wrong, empty, missing."""
    rng = random.Random(seed)
    preds = {}
    for article in raw["data"]:
        for para in article["paragraphs"]:
            ctx = para["context"]
            for qa in para["qas"]:
                ans = qa["answers"][rng.randrange(len(qa["answers"]))]
                s, e = ans["answer_start"], ans["answer_start"] + len(ans["text"])
                kind = rng.randrange(7)
                if kind == 0:
                    preds[qa["id"]] = ans["text"]
                elif kind == 1:
                    preds[qa["id"]] = "The " + ans["text"].upper() + "."
                elif kind == 2:  # overlapping span, a few characters off on each side
                    preds[qa["id"]] = ctx[max(0, s - rng.randrange(15)):e + rng.randrange(15)]
                elif kind == 3:
                    a = rng.randrange(len(ctx))
                    preds[qa["id"]] = ctx[a:a + rng.randrange(1, 40)]
                elif kind == 4:
                    preds[qa["id"]] = ""
                elif kind == 5:
                    preds[qa["id"]] = ans["text"][: max(1, len(ans["text"]) // 2)]
                # kind 6: missing
    return preds


def test_real_dev_file_against_transcription(shared_data, tmp_path):
    dev_path = shared_data / "squad" / "dev-v1.1-articles-00-23.json"
    raw = json.loads(dev_path.read_text(encoding="utf-8"))
    preds = _prediction_table(raw)
    data = read_squad(dev_path)
    assert not data.version_2
    ours = evaluate(data.examples, preds, version_2=False)
    em, f1 = ref_scores(raw, preds)
    assert ours["exact_match"] == pytest.approx(em, abs=1e-9)
    assert ours["f1"] == pytest.approx(f1, abs=1e-9)
    assert ours["total"] == sum(len(p["qas"]) for a in raw["data"] for p in a["paragraphs"])
    assert ours["missing"] == ours["total"] - len(preds) > 0
    assert 0 < em < f1 < 100  # the table exercises partial credit, not only all-or-nothing

    # The command line reads the same files and prints the same figures as its last line.
    pred_file = tmp_path / "predictions.json"
    pred_file.write_text(json.dumps(preds))
    run = subprocess.run([sys.executable, "-m", "finetune.evaluate", str(dev_path), str(pred_file)],
                         capture_output=True, text=True, check=True)
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert last["exact_match"] == pytest.approx(em, abs=1e-9)
    assert last["f1"] == pytest.approx(f1, abs=1e-9)
    assert "missing prediction for question" in run.stderr


def test_real_dev_file_perfect_and_normalization_only(shared_data):
    dev_path = shared_data / "squad" / "dev-v1.1-articles-00-23.json"
    data = read_squad(dev_path)
    perfect = {e.qid: e.answers[0] for e in data.examples}
    assert evaluate(data.examples, perfect, False)["exact_match"] == 100.0
    noisy = {e.qid: f"  the {e.answers[0].upper()}!! " for e in data.examples}
    raw = json.loads(dev_path.read_text(encoding="utf-8"))
    ours = evaluate(data.examples, noisy, False)
    assert (ours["exact_match"], ours["f1"]) == pytest.approx(ref_scores(raw, noisy), abs=1e-9)


# ---------------------------------------------------------------- command line errors
def test_cli_rejects_non_squad_files(tmp_path):
    bad = tmp_path / "notsquad.json"
    bad.write_text('{"version": "1.1", "articles": []}')
    preds = tmp_path / "p.json"
    preds.write_text("{}")
    run = subprocess.run([sys.executable, "-m", "finetune.evaluate", str(bad), str(preds)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "notsquad.json" in run.stderr and "'data'" in run.stderr

    good = tmp_path / "d.json"
    good.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "q", "answers": [{"text": "c", "answer_start": 0}]}]}]}]}))
    preds.write_text('["not", "a", "mapping"]')
    run = subprocess.run([sys.executable, "-m", "finetune.evaluate", str(good), str(preds)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "p.json" in run.stderr and "question id" in run.stderr


def test_cli_v2_with_null_odds(tmp_path):
    """v2 file: HasAns/NoAns figures, and with --na-prob-file the best threshold is reported; it
    can only improve on answering everything."""
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where?", "is_impossible": False,
         "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "b", "question": "When?", "is_impossible": True, "answers": []},
        {"id": "c", "question": "Who?", "is_impossible": True, "answers": []}]}]}]}
    d = tmp_path / "v2.json"
    d.write_text(json.dumps(data))
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"a": "France", "b": "Paris", "c": "Paris"}))
    na = tmp_path / "na.json"
    na.write_text(json.dumps({"a": -2.0, "b": 1.0, "c": 3.0}))
    run = subprocess.run([sys.executable, "-m", "finetune.evaluate", str(d), str(p),
                          "--na-prob-file", str(na)], capture_output=True, text=True, check=True)
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["HasAns_total"] == 1 and res["NoAns_total"] == 2
    assert res["f1"] == pytest.approx(100 / 3)  # only "a" right when everything is answered
    assert res["best_f1"] == 100.0 and -2.0 <= res["best_null_threshold"] < 1.0
