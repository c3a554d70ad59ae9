"""Reference for bench/squad.py: SQuAD v1.1 fine-tuning with a plain ``transformers`` ``Trainer``.

Deliberately independent of ``finetune/`` except for the metric (``finetune.evaluate``, tested
against a transcription of the official rules): its own JSON flattening, the usual Hugging Face
windowing (padding per batch, as run_qa.py does with ``--pad_to_max_length False``) and the usual
"best start+end over the top-n logits" postprocessing, without BERT's max-context rule.

    python bench/squad_reference.py --checkpoint DIR --train-file F --predict-file F --output OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def flatten(path, limit):
    rows = []
    for article in json.loads(Path(path).read_text(encoding="utf-8"))["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"id": qa["id"], "context": para["context"],
                             "question": qa["question"].lstrip(),
                             "answers": [a["text"] for a in qa["answers"]],
                             "starts": [a["answer_start"] for a in qa["answers"]]})
    return rows[:limit or None]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--train-file", required=True)
    ap.add_argument("--predict-file", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128,
                    help="tokens between window starts (BERT's and finetune/squad.py's meaning); with "
                         "--stride-meaning overlap, the overlap between windows (run_qa.py's)")
    ap.add_argument("--stride-meaning", choices=("starts", "overlap"), default="starts",
                    help="starts: the tokenizer's overlap is set per question length so windows start "
                         "--doc-stride tokens apart, the windows finetune/squad.py makes")
    ap.add_argument("--n-best-size", type=int, default=20)
    ap.add_argument("--max-answer-length", type=int, default=30)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--predict-batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-train-examples", type=int, default=0)
    ap.add_argument("--max-predict-examples", type=int, default=0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args(argv)

    from datasets import Dataset
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)

    from finetune.data import read_squad
    from finetune.evaluate import evaluate

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    set_seed(args.seed)  # before the QA head is initialised, as finetune/squad.py does
    model = AutoModelForQuestionAnswering.from_pretrained(args.checkpoint)
    train_rows = flatten(args.train_file, args.max_train_examples)
    dev_rows = flatten(args.predict_file, args.max_predict_examples)

    n_special = tok.num_special_tokens_to_add(pair=True)

    def encode(batch):
        """Windows of every question, as lists (with each window's sequence ids). The tokenizer's
        ``stride`` is an overlap; for window starts ``--doc-stride`` apart it depends on the
        question's length, so questions are encoded in groups of equal length."""
        qs, cs = batch["question"], batch["context"]
        if args.stride_meaning == "overlap":
            groups = {args.doc_stride: list(range(len(qs)))}
        else:
            groups = {}
            for i, ids in enumerate(tok(qs, add_special_tokens=False)["input_ids"]):
                budget = args.max_seq_length - len(ids) - n_special
                groups.setdefault(max(0, budget - args.doc_stride), []).append(i)
        out: dict[str, list] = {}
        for overlap, idx in groups.items():
            enc = tok([qs[i] for i in idx], [cs[i] for i in idx], truncation="only_second",
                      max_length=args.max_seq_length, stride=overlap,
                      return_overflowing_tokens=True, return_offsets_mapping=True)
            for r in range(len(enc["input_ids"])):
                for k in enc.keys():
                    v = enc[k][r]
                    out.setdefault(k, []).append(idx[v] if k == "overflow_to_sample_mapping" else v)
                out.setdefault("sequence_ids", []).append(enc.sequence_ids(r))
        return out

    def train_features(batch):
        enc = encode(batch)
        enc["start_positions"], enc["end_positions"] = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            ex = enc["overflow_to_sample_mapping"][i]
            a0 = batch["starts"][ex][0]
            a1 = a0 + len(batch["answers"][ex][0])
            seq = enc["sequence_ids"][i]
            c0, c1 = seq.index(1), len(seq) - 1 - seq[::-1].index(1)
            if not (offsets[c0][0] <= a0 and offsets[c1][1] >= a1):
                enc["start_positions"].append(0)
                enc["end_positions"].append(0)
                continue
            s = c0
            while s <= c1 and offsets[s][0] <= a0:
                s += 1
            e = c1
            while e >= c0 and offsets[e][1] >= a1:
                e -= 1
            enc["start_positions"].append(s - 1)
            enc["end_positions"].append(e + 1)
        enc.pop("offset_mapping")
        enc.pop("overflow_to_sample_mapping")
        enc.pop("sequence_ids")
        return enc

    def eval_features(batch):
        enc = encode(batch)
        enc["example_id"] = []
        for i in range(len(enc["input_ids"])):
            seq = enc["sequence_ids"][i]
            enc["example_id"].append(batch["id"][enc["overflow_to_sample_mapping"][i]])
            enc["offset_mapping"][i] = [o if seq[k] == 1 else None
                                        for k, o in enumerate(enc["offset_mapping"][i])]
        enc.pop("overflow_to_sample_mapping")
        enc.pop("sequence_ids")
        return enc

    train_ds = Dataset.from_list(train_rows)
    train_ds = train_ds.map(train_features, batched=True, remove_columns=train_ds.column_names)
    dev_ds = Dataset.from_list(dev_rows)
    dev_feats = dev_ds.map(eval_features, batched=True, remove_columns=dev_ds.column_names)

    targs = TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.predict_batch_size, learning_rate=args.lr,
        num_train_epochs=args.epochs, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
        bf16=args.bf16, use_cpu=True, save_strategy="no", report_to=[], logging_steps=50,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    train_out = trainer.train()
    train_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    pred = trainer.predict(dev_feats.remove_columns(["example_id", "offset_mapping"]))
    start_logits, end_logits = pred.predictions[:2]
    by_id: dict[str, list[int]] = {}
    for i, qid in enumerate(dev_feats["example_id"]):
        by_id.setdefault(qid, []).append(i)
    offsets_all = dev_feats["offset_mapping"]
    predictions = {}
    for row in dev_rows:
        best, best_score = "", -np.inf
        for i in by_id.get(row["id"], []):
            offs = offsets_all[i]
            for s in np.argsort(start_logits[i])[::-1][:args.n_best_size]:
                for e in np.argsort(end_logits[i])[::-1][:args.n_best_size]:
                    if s >= len(offs) or e >= len(offs) or offs[s] is None or offs[e] is None:
                        continue
                    if e < s or e - s + 1 > args.max_answer_length:
                        continue
                    score = start_logits[i][s] + end_logits[i][e]
                    if score > best_score:
                        best_score, best = score, row["context"][offs[s][0]:offs[e][1]]
        predictions[row["id"]] = best
    predict_time = time.perf_counter() - t0

    examples = read_squad(args.predict_file).examples[:args.max_predict_examples or None]
    metrics = evaluate(examples, predictions, version_2=False)
    metrics.update({
        "train_windows": len(train_ds), "train_questions": len(train_rows),
        "train_seconds": train_time,
        "train_windows_per_second": len(train_ds) * args.epochs / train_time,
        "train_questions_per_second": len(train_rows) * args.epochs / train_time,
        "trainer_train_samples_per_second": train_out.metrics.get("train_samples_per_second"),
        "predict_seconds": predict_time, "predict_questions": len(dev_rows),
        "predict_questions_per_second": len(dev_rows) / predict_time,
        "args": vars(args)})
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from data_prep.atomic import write_json  # the bench reads metrics.json as "this run finished"

    write_json(out / "predictions.json", predictions)
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: metrics[k] for k in ("exact_match", "f1")}))


if __name__ == "__main__":
    main()
