"""End to end: finetune/squad.py on slices of the real SQuAD files with a tiny random BERT."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.data import read_squad
from finetune.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "finetune" / "squad.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def _run(args, launcher=None, check=True):
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


SMALL = ["--max-seq-length", 128, "--doc-stride", 64, "--max-query-length", 32,
         "--batch-size", 8, "--epochs", 1, "--lr", 1e-3, "--predict-batch-size", 32]


def _check_outputs(out: Path, examples, version_2=False):
    preds = json.loads((out / "predictions.json").read_text())
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(preds) == {e.qid for e in examples} == set(nbest)
    by_id = {e.qid: e for e in examples}
    for qid, text in preds.items():
        assert text in by_id[qid].context  # spans come back as exact context substrings
        cands = nbest[qid]
        assert 1 <= len(cands) <= 20
        assert sum(c["probability"] for c in cands) == pytest.approx(1.0, abs=1e-6)
        for c in cands:
            if c["text"]:
                assert by_id[qid].context[c["start_char"]:c["end_char"]] == c["text"]
    # metrics.json agrees with the metric recomputed from the written predictions
    again = evaluate(examples, preds, version_2)
    assert metrics["exact_match"] == pytest.approx(again["exact_match"])
    assert metrics["f1"] == pytest.approx(again["f1"])
    assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
    return preds, metrics


@pytest.mark.slow
def test_train_predict_v1(shared_data, tiny_checkpoint, tmp_path):
    train = shared_data / "squad" / "train-v1.1-articles-00-43.json"
    dev = shared_data / "squad" / "dev-v1.1-articles-00-23.json"
    out = tmp_path / "out"
    proc = _run(["--checkpoint", tiny_checkpoint, "--train-file", train, "--predict-file", dev,
                 "--output", out, "--max-train-examples", 96, "--max-predict-examples", 40,
                 "--eval-every", 5, "--max-steps", 10, *SMALL])
    examples = read_squad(dev).examples[:40]
    preds, metrics = _check_outputs(out, examples)
    assert metrics["train_steps"] == 10 < metrics["train_windows"] / 8  # --max-steps stops early
    assert [e["step"] for e in metrics["eval_during_training"]] == [5, 10]
    assert metrics["train_windows_seen"] == 80
    assert metrics["train_questions"] == 96
    # windows without the answer are counted, not silently dropped
    assert metrics["train_skips"]["windows not containing the answer (trained on [CLS])"]["count"] > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["f1"] == pytest.approx(metrics["f1"])

    # The official-style command line gives the same figures on the same slice.
    raw = json.loads(dev.read_text())
    keep = {e.qid for e in examples}
    for art in raw["data"]:
        for para in art["paragraphs"]:
            para["qas"] = [qa for qa in para["qas"] if qa["id"] in keep]
    sliced = tmp_path / "dev_slice.json"
    sliced.write_text(json.dumps(raw))
    ev = subprocess.run([sys.executable, "-m", "finetune.evaluate", str(sliced),
                         str(out / "predictions.json")], capture_output=True, text=True, cwd=ROOT,
                        check=True)
    last = json.loads(ev.stdout.strip().splitlines()[-1])
    assert last["exact_match"] == pytest.approx(metrics["exact_match"])
    assert last["f1"] == pytest.approx(metrics["f1"])


@pytest.mark.slow
def test_train_predict_v2_threshold(shared_data, tiny_checkpoint, tmp_path):
    """A SQuAD 2.0 file made from real questions: every third one gets another article's context
    and becomes unanswerable. The chosen null threshold must reproduce the reported scores.
    Also runs in bf16, which DeepSpeed supports on the CPU."""
    raw = json.loads((shared_data / "squad" / "train-v1.1-articles-00-43.json").read_text())
    paras = [p for a in raw["data"][:3] for p in a["paragraphs"]][:12]
    other = raw["data"][5]["paragraphs"]
    v2 = {"version": "v2.0", "data": [{"title": "mix", "paragraphs": []}]}
    for i, para in enumerate(paras):
        qas = []
        for j, qa in enumerate(para["qas"][:4]):
            qas.append({**qa, "is_impossible": False})
        v2["data"][0]["paragraphs"].append({"context": para["context"], "qas": qas})
        if i % 3 == 0:
            v2["data"][0]["paragraphs"].append({"context": other[i]["context"], "qas": [
                {"id": f"imp{i}", "question": para["qas"][0]["question"], "answers": [],
                 "is_impossible": True}]})
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(v2))
    out = tmp_path / "out"
    _run(["--checkpoint", tiny_checkpoint, "--train-file", path, "--predict-file", path,
          "--output", out, "--version-2", "--bf16", *SMALL])
    examples = read_squad(path).examples
    preds, metrics = _check_outputs(out, examples, version_2=True)
    assert metrics["null_threshold_source"] == "best F1 on the predict file"
    odds = json.loads((out / "null_odds.json").read_text())
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    t = metrics["null_score_diff_threshold"]
    for qid, text in preds.items():
        best_text = next((c["text"] for c in nbest[qid] if c["text"]), "")
        null = odds[qid] is None or odds[qid] > t  # None: no valid span in any window
        assert text == ("" if null else best_text)
    assert metrics["precision"] == "bf16" and metrics["model_dtype"] == "bfloat16"
    assert metrics["NoAns_total"] == 4 and metrics["HasAns_total"] == len(examples) - 4


def test_bad_input_fails_before_writing(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
    out = tmp_path / "out"
    proc = _run(["--checkpoint", tiny_checkpoint, "--train-file", bad, "--output", out], check=False)
    assert proc.returncode == 2
    assert "bad.json: data[0].paragraphs[0] has no key 'context'" in proc.stderr
    assert not out.exists()
    proc = _run(["--checkpoint", tmp_path, "--predict-file", bad, "--output", out], check=False)
    assert proc.returncode == 2 and not out.exists()


def test_predict_only_counts_empty_context(tiny_checkpoint, tmp_path):
    """No --train-file: the checkpoint is only used to predict. A question with an empty context
    is skipped by name, answered "" and still counted in the scores."""
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "Denver Broncos won Super Bowl 50.", "qas": [
            {"id": "ok", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 0}]}]},
        {"context": "", "qas": [
            {"id": "blank", "question": "Who lost?", "answers": [{"text": "Carolina", "answer_start": 0}]}]},
    ]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    _run(["--checkpoint", tiny_checkpoint, "--predict-file", path, "--output", out,
          "--max-seq-length", 64, "--max-query-length", 16])
    preds = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert preds["blank"] == "" and "ok" in preds
    assert metrics["predict_skips"]["empty context"] == {"count": 1, "examples": ["blank"]}
    assert metrics["total"] == 2 and metrics["missing"] == 0
    assert "train_steps" not in metrics
    eff = json.loads((out / "config.effective.json").read_text())  # what ran, beside what it produced
    assert eff["deepspeed"]["fp16"]["enabled"] is False and metrics["precision"] in ("fp32", "bf16")
    assert eff["deepspeed"]["bf16"]["enabled"] is (metrics["precision"] == "bf16")


def test_a_file_without_one_usable_question_is_a_named_error(tiny_checkpoint, tmp_path):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "", "qas": [{"id": "a", "question": "Who?", "answers": [{"text": "x", "answer_start": 0}]}]},
        {"context": "Denver won.", "qas": [{"id": "b", "question": "Who?",
                                             "answers": [{"text": "Carolina", "answer_start": 0}]}]},
    ]}]}
    path = tmp_path / "unusable.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    proc = _run(["--checkpoint", tiny_checkpoint, "--train-file", path, "--output", out, *SMALL], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"{path}: no usable question among 2 (skipped: " in proc.stderr
    assert not (out / "metrics.json").exists()
