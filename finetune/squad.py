"""Fine-tune an encoder on SQuAD v1.1 / v2.0 and predict, with DeepSpeed (one or many processes).

    python finetune/squad.py --checkpoint DIR --train-file train.json --predict-file dev.json --output OUT
    deepspeed --num_gpus 2 finetune/squad.py ... --config ds_configs/squad.json

Writes OUT/predictions.json (id -> answer, what ``python -m finetune.evaluate`` reads),
OUT/nbest_predictions.json, OUT/metrics.json (and OUT/null_odds.json with --version-2). None of
them is written until training and prediction have succeeded. One code path for both launches: a
plain ``python`` run is a DeepSpeed job of world size 1.

Nothing is lost on a stop: SIGTERM, Ctrl-C or Slurm's SIGUSR1 saves a checkpoint in
OUT/checkpoints one step later and exits 0 (so does every ``--checkpoint-every`` steps, and the end
of training); the same command with ``--resume`` continues from it (``finetune/train.py``), or
does nothing if the run has finished. The checkpoints are removed once the results are written.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from data_prep.atomic import write_json
from finetune import train as train_mod
from finetune.checkpoint import CheckpointError, load_model
from finetune.data import SquadFormatError, Skips, read_squad
from finetune.evaluate import best_null_threshold, evaluate
from finetune.features import Prediction, build_features, postprocess

log = logging.getLogger("finetune.squad")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "squad.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="Hugging Face model directory, or a pretraining run/checkpoint dir of pretrain/run.py")
    ap.add_argument("--train-file", help="SQuAD JSON to fine-tune on (omit to only predict)")
    ap.add_argument("--predict-file", help="SQuAD JSON to predict (scored when it has answers)")
    ap.add_argument("--output", required=True, help="directory for predictions and metrics")
    ap.add_argument("--version-2", action="store_true", help="SQuAD 2.0: allow no-answer predictions")
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128,
                    help="tokens between the starts of consecutive context windows (BERT's meaning)")
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--n-best-size", type=int, default=20)
    ap.add_argument("--max-answer-length", type=int, default=30, help="in tokens")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (all processes)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--predict-batch-size", type=int, default=64, help="per process")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warm-up")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-train-examples", type=int, default=0, help="first N questions (0: all)")
    ap.add_argument("--max-predict-examples", type=int, default=0, help="first N questions (0: all)")
    ap.add_argument("--null-score-diff-threshold", type=float, default=None,
                    help="v2: predict no answer when null score - best span score exceeds this; "
                         "default: the threshold that maximises F1 on the predict file")
    ap.add_argument("--eval-every", type=int, default=0, help="also predict+score every N steps")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (also on CPU)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="DeepSpeed JSON config")
    ap.add_argument("--save-model", action="store_true", help="also save the model to OUT/model")
    ap.add_argument("--checkpoint-every", type=int, default=1000,
                    help="save OUT/checkpoints every N steps (0: only on a stop request)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.train_file and not args.predict_file:
        ap.error("give --train-file, --predict-file or both")
    if args.checkpoint_every < 0:
        ap.error("--checkpoint-every must be 0 (only on a stop request) or more")
    for name in ("max_seq_length", "doc_stride", "max_query_length", "n_best_size",
                 "max_answer_length", "batch_size", "grad_accum", "predict_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_seq_length < args.max_query_length + 4:
        ap.error(f"--max-seq-length {args.max_seq_length} leaves no room for the context after a "
                 f"--max-query-length {args.max_query_length} question")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ds_config(args, world: int) -> dict:
    """The DeepSpeed config the run uses: the JSON, the batch arithmetic, and its precision with
    ``"auto"`` resolved (``--bf16`` forces bf16), as pretraining reads it."""
    from optim import load_config, resolve_precision

    try:
        cfg = load_config(args.config)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot read the DeepSpeed config {e}") from None
    if "optimizer" in cfg:
        raise ValueError(f"{args.config}: remove the 'optimizer' block; the script builds AdamW "
                         f"itself (DeepSpeed's fused Adam needs a C++ build on CPU)")
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {world} processes "
                         f"x {args.grad_accum} accumulation steps")
    cfg["train_batch_size"] = args.batch_size
    cfg["train_micro_batch_size_per_gpu"] = args.batch_size // (world * args.grad_accum)
    cfg["gradient_accumulation_steps"] = args.grad_accum
    if args.bf16:
        cfg["bf16"] = dict(cfg.get("bf16") or {}, enabled=True)
        cfg["fp16"] = dict(cfg.get("fp16") or {}, enabled=False)
    precision = resolve_precision(cfg, source=str(args.config))
    if precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            raise ValueError(f"{args.config}: fp16 needs a GPU (DeepSpeed refuses it on the CPU); set "
                             "\"fp16\": {\"enabled\": \"auto\"} or use bf16")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_comment")}
    return cfg


class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, feats, with_labels: bool):
        self.cols = dict(feats.inputs)
        if with_labels:
            self.cols["start_positions"] = feats.start_positions
            self.cols["end_positions"] = feats.end_positions

    def __len__(self):
        return len(self.cols["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.cols.items()}


def collate(rows):
    """Stack, then cut the padding every row of this batch has (windows are padded to max length)."""
    batch = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}
    width = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}


@torch.no_grad()
def predict_logits(engine, feats, args, rank, world, device):
    """Each process scores a contiguous shard; rank 0 gets all logits in feature order."""
    n = len(feats)
    lo, hi = n * rank // world, n * (rank + 1) // world
    shard = torch.utils.data.Subset(FeatureDataset(feats, with_labels=False), range(lo, hi))
    # its own generator: an evaluation during training must not draw from the global RNG (dropout)
    loader = torch.utils.data.DataLoader(shard, batch_size=args.predict_batch_size, collate_fn=collate,
                                         generator=torch.Generator())
    seq = feats.inputs["input_ids"].shape[1]
    starts, ends = [], []
    engine.eval()
    from tqdm.auto import tqdm
    for batch in tqdm(loader, desc="predict", disable=rank != 0, leave=False):
        out = engine(**{k: v.to(device) for k, v in batch.items()})
        pad = seq - out.start_logits.shape[1]  # restore the cut padding so windows line up
        starts.append(torch.nn.functional.pad(out.start_logits.float(), (0, pad), value=-1e4).cpu())
        ends.append(torch.nn.functional.pad(out.end_logits.float(), (0, pad), value=-1e4).cpu())
    engine.train()
    local = (torch.cat(starts).numpy() if starts else np.zeros((0, seq), np.float32),
             torch.cat(ends).numpy() if ends else np.zeros((0, seq), np.float32))
    if world == 1:
        return local
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    return (np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))


def score_predictions(preds, examples, args, has_answers: bool):
    """-> (id -> answer text, metrics). For v2, applies the given or the F1-best null threshold."""
    answers = {qid: p.text for qid, p in preds.items()}
    diffs = {qid: p.null_diff for qid, p in preds.items()}
    metrics = {}
    if args.version_2:
        if args.null_score_diff_threshold is None and has_answers:
            best = best_null_threshold(examples, answers, diffs)
            thresh, metrics["null_threshold_source"] = best["threshold"], "best F1 on the predict file"
        else:
            thresh = args.null_score_diff_threshold or 0.0
            metrics["null_threshold_source"] = "given" if args.null_score_diff_threshold is not None \
                else "default 0 (predict file has no answers)"
        metrics["null_score_diff_threshold"] = thresh
        final = {q: ("" if diffs[q] > thresh else a) for q, a in answers.items()}
    else:
        final = answers
    if has_answers:
        metrics.update(evaluate(examples, final, args.version_2))
    return final, metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output)
    fp = train_mod.fingerprint(args) if args.train_file else None
    try:  # before anything is read or loaded: a refused resume should not take minutes to say so
        state = train_mod.check_output(out_dir, args.resume, fp) if fp else "fresh"
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state == "done":
        print(f"--resume: {out_dir} holds this run's results already (metrics.json); nothing to do "
              "(without --resume the run starts over)", flush=True)
        return 0
    resuming = state == "resume"

    # Everything that can fail on bad input fails here, before training and before any output.
    try:
        train = read_squad(args.train_file) if args.train_file else None
        dev = read_squad(args.predict_file) if args.predict_file else None
        for data in (train, dev):
            if data and data.version_2 and not args.version_2:
                log.warning("%s has SQuAD 2.0 questions (is_impossible) but --version-2 is not set: "
                            "no-answer questions are then trained on [CLS] and never predicted "
                            "empty", data.path)
        seed_everything(args.seed)  # before the QA head is initialised
        model, tokenizer = load_model(args.checkpoint)
    except (SquadFormatError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import deepspeed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from optim import param_groups
    from optim.precision import precision_of
    from pretrain.distributed import init_distributed

    rank, world = init_distributed()
    try:
        if resuming:
            train_mod.check_world(out_dir, world)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    device = torch.device(deepspeed.accelerator.get_accelerator().current_device_name())
    feat_kw = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                   max_query_length=args.max_query_length, version_2=args.version_2)
    try:
        cfg = ds_config(args, world)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics: dict = {"world_size": world, "precision": precision_of(cfg),
                     "args": {k: v for k, v in vars(args).items() if k != "local_rank"}}

    dev_feats = None
    if dev:
        dev_examples = dev.examples[:args.max_predict_examples or None]
        dev_skips = Skips()
        try:
            dev_feats = build_features(dev_examples, tokenizer, training=False, skips=dev_skips, **feat_kw)
        except ValueError as e:
            print(f"error: {args.predict_file}: {e}", file=sys.stderr)
            return 2
        has_answers = any(e.answers for e in dev_examples)
        log.info("predict: %d questions -> %d windows; skipped: %s", len(dev_feats.examples),
                 len(dev_feats), dev_skips.describe())
        metrics["predict_skips"] = dev_skips.report()

    def run_prediction():
        t0 = time.perf_counter()
        s_log, e_log = predict_logits(engine, dev_feats, args, rank, world, device)
        preds = {}
        if rank == 0:
            preds = postprocess(dev_feats, s_log, e_log, n_best_size=args.n_best_size,
                                max_answer_length=args.max_answer_length, version_2=args.version_2)
            # Skipped questions (e.g. empty context) get the only possible answer: none.
            for ex in dev_examples:
                if ex.qid not in preds:
                    preds[ex.qid] = Prediction("", 0.0, [  # "" whatever the threshold
                        {"text": "", "start_logit": None, "end_logit": None, "score": None,
                         "start_char": -1, "end_char": -1, "probability": 1.0}])
        return preds, time.perf_counter() - t0

    params = param_groups(model, args.weight_decay)  # the one no-decay rule, as pretraining
    # Fused AdamW (one kernel over all tensors) where torch has it: on the CPU the default
    # AdamW steps one tensor at a time (measured 141 ms against 28 ms per step for MiniLM's
    # 22.7M parameters, 1 thread).
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=device.type in ("cpu", "cuda"))

    loader, total_steps = None, 0
    if train:
        train_skips = Skips()
        train_examples = train.examples[:args.max_train_examples or None]
        try:
            train_feats = build_features(train_examples, tokenizer, training=True, skips=train_skips, **feat_kw)
        except ValueError as e:
            print(f"error: {args.train_file}: {e}", file=sys.stderr)
            return 2
        log.info("train: %d questions -> %d windows; counted: %s", len(train_feats.examples),
                 len(train_feats), train_skips.describe())
        metrics["train_skips"] = train_skips.report()
        if not len(train_feats):
            print(f"error: {args.train_file}: no usable training question ({train_skips.describe()})",
                  file=sys.stderr)
            return 2
        dataset = FeatureDataset(train_feats, with_labels=True)
        sampler = train_mod.SkipSampler(torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed))
        # its own generator: starting an epoch's iterator must not draw from the global RNG
        # (dropout), or a resumed run would not repeat the uninterrupted one
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["train_micro_batch_size_per_gpu"],
                                             sampler=sampler, collate_fn=collate, drop_last=False,
                                             generator=torch.Generator().manual_seed(0))
        steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
        total_steps = math.ceil(steps_per_epoch * args.epochs)
        if args.max_steps:
            total_steps = min(total_steps, args.max_steps)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(args.warmup * total_steps), max(total_steps, 1))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=cfg)
    if world == 1 and engine.zero_optimization_stage() == 0:
        # With one process and no ZeRO, DeepSpeed still packs every gradient into a bucket,
        # all-reduces it with itself and copies it back after each backward: pure overhead (the
        # result is the gradient itself), skipped. (ZeRO stages do their bookkeeping there.)
        engine.enable_backward_allreduce = False

    metrics["model_dtype"] = str(next(engine.module.parameters()).dtype).replace("torch.", "")
    if train:
        def evaluate_at(step: int):
            preds, _ = run_prediction()
            if rank != 0 or not has_answers:
                return None
            _, m = score_predictions(preds, dev_examples, args, True)
            tqdm.write(f"step {step}: EM {m['exact_match']:.2f} F1 {m['f1']:.2f}")
            return {"step": step, "exact_match": m["exact_match"], "f1": m["f1"]}

        try:
            progress = train_mod.resume(engine, out_dir, rank, world) if resuming else train_mod.Progress(world=world)
        except (ValueError, RuntimeError) as e:  # no checkpoint loads; one of another model
            print(f"error: {e}", file=sys.stderr)
            return 2
        stopped = train_mod.train(engine, loader, sampler, total_steps=total_steps, grad_accum=args.grad_accum,
                                  world=world, rank=rank, out_dir=out_dir, fp=fp,
                                  model_config_json=engine.module.config.to_json_string(),
                                  checkpoint_every=args.checkpoint_every, progress=progress,
                                  evaluate=evaluate_at if dev_feats is not None else None,
                                  eval_every=args.eval_every)
        if stopped:
            return 0
        seen, train_time = progress.seen, progress.train_seconds
        metrics.update({"train_steps": progress.step, "train_windows": len(train_feats),
                        "train_windows_seen": seen,
                        "train_seconds": train_time,
                        "train_windows_per_second": seen / train_time,
                        "train_questions": len(train_feats.examples),
                        "train_questions_per_second":
                            len(train_feats.examples) * seen / len(train_feats) / train_time})
        metrics["fingerprint"] = fp  # a --resume of the finished run finds it here
        if resuming:
            metrics["resumed"] = True
        if progress.eval_log:
            metrics["eval_during_training"] = progress.eval_log

    final = nbest = null_odds = None
    if dev_feats is not None:
        preds, predict_time = run_prediction()
        if rank == 0:
            final, m = score_predictions(preds, dev_examples, args, has_answers)
            metrics.update(m)
            metrics.update({"predict_seconds": predict_time, "predict_questions": len(dev_examples),
                            "predict_questions_per_second": len(dev_examples) / predict_time})
            nbest = {q: p.nbest for q, p in preds.items()}
            # null when no span was valid at all: JSON has no infinity, so None
            null_odds = {q: (p.null_diff if math.isfinite(p.null_diff) else None)
                         for q, p in preds.items()}

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if final is not None:
            write_json(out_dir / "predictions.json", final)
            write_json(out_dir / "nbest_predictions.json", nbest)
            if args.version_2:
                write_json(out_dir / "null_odds.json", null_odds)
        if args.save_model:
            engine.module.save_pretrained(out_dir / "model")
            tokenizer.save_pretrained(out_dir / "model")
        write_json(out_dir / "metrics.json", metrics)
        write_json(out_dir / "config.effective.json", {"deepspeed": cfg, "optimizer": {
            "type": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay, "schedule": "linear",
            "warmup": args.warmup, "total_steps": total_steps}, "args": metrics["args"]})
        if train:
            train_mod.remove_checkpoints(out_dir)
        summary = {k: metrics[k] for k in ("exact_match", "f1") if k in metrics}
        log.info("wrote %s; %s", out_dir, json.dumps(summary))
        print(json.dumps(summary))
    if world > 1:
        torch.distributed.barrier()
    return 0



if __name__ == "__main__":
    sys.exit(main())
