"""Export a pretraining checkpoint as a Hugging Face model directory.

    python -m pretrain.export CHECKPOINT OUT [--vocab VOCAB_DIR]

CHECKPOINT is a run's output dir (its latest checkpoint), a ``checkpoints`` dir, or one
checkpoint dir. OUT receives ``config.json``, ``model.safetensors`` (fp32 weights, merged from
the ZeRO partitions) and the tokenizer files, loadable with
``transformers.AutoModelForPreTraining`` / ``AutoModelForQuestionAnswering.from_pretrained``.
The directory is written beside OUT and renamed into place, so OUT is complete or absent.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from data_prep.atomic import atomic_path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export(checkpoint: str | Path, out: str | Path, vocab_dir: Optional[str | Path] = None) -> Path:
    from transformers import BertConfig, BertForPreTraining

    from . import checkpoint as ckpt
    from .model import load_weights

    ckpt_dir, tag = ckpt.resolve(checkpoint)
    tag_dir = ckpt_dir / tag
    cfg_file = tag_dir / "model_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{tag_dir}: no model_config.json (not written by pretrain/run.py?)")
    meta = json.loads(cfg_file.read_text())
    config = BertConfig.from_dict(meta["bert"])
    config.architectures = ["BertForPreTraining"]
    model = BertForPreTraining(config)
    load_weights(model, ckpt.fp32_state_dict(ckpt_dir, tag), str(tag_dir))
    model.tie_weights()

    vocab = Path(vocab_dir) if vocab_dir else (Path(meta["vocab_dir"]) if meta.get("vocab_dir") else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        if vocab is not None:
            copied = _copy_tokenizer(vocab, tmp)
            if not copied:
                print(f"export: no tokenizer files in {vocab}", file=sys.stderr)
        (tmp / "pretraining_source.json").write_text(json.dumps(
            {"checkpoint": str(tag_dir.resolve()), "step": meta.get("step"), "pretrain": meta.get("pretrain")},
            indent=1))
    return out


def _copy_tokenizer(vocab: Path, dest: Path) -> list[str]:
    if vocab.is_file():
        vocab = vocab.parent
    copied = []
    for name in TOKENIZER_FILES:
        if (vocab / name).is_file():
            shutil.copy2(vocab / name, dest / name)
            copied.append(name)
    if copied and not (dest / "tokenizer_config.json").is_file():
        (dest / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast",
                                                                "do_lower_case": True}))
    return copied


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run output dir, checkpoints dir, or one checkpoint dir")
    ap.add_argument("out", help="Hugging Face model directory to write")
    ap.add_argument("--vocab", help="tokenizer/vocab dir (default: the one recorded at training time)")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.vocab)
    except (FileNotFoundError, ValueError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    print(f"export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
