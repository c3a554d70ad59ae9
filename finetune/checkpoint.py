"""Loading the encoder to fine-tune: one entry point, ``load_model(path)``.

It accepts a Hugging Face directory (``config.json`` + weights + tokenizer files), such as
``pretrain.export`` writes, or a pretraining DeepSpeed checkpoint written by ``pretrain/run.py``
(a run directory, its ``checkpoints`` directory, or one checkpoint), which is exported to a
temporary Hugging Face directory first (fp32 weights merged from the ZeRO partitions, and the
tokenizer recorded at pretraining time).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class CheckpointError(ValueError):
    """The directory is not something we can fine-tune from; the message says what was expected."""


def _looks_like_deepspeed(path: Path) -> bool:
    """A run dir, its checkpoints dir or one checkpoint (``latest`` may be missing: it is optional)."""
    return ((path / "latest").is_file() or (path / "checkpoints" / "latest").is_file()
            or any(path.glob("global_step*")) or any(path.glob("mp_rank_*_model_states.pt"))
            or any(path.glob("*/mp_rank_*_model_states.pt")) or any(path.glob("checkpoints/*/mp_rank_*_model_states.pt")))


def export_deepspeed(path: Path) -> Path:
    """A temporary Hugging Face export of a pretraining checkpoint (removed at exit)."""
    from pretrain.export import export

    tmp = Path(tempfile.mkdtemp(prefix="finetune_ckpt_"))
    atexit.register(shutil.rmtree, tmp, True)
    try:
        out = export(path, tmp / "hf")
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{path}: looks like a DeepSpeed checkpoint but cannot be exported ({exc}); "
                              "checkpoints written by pretrain/run.py are supported, others can be "
                              "converted with `python -m pretrain.export` first") from None
    if not any((out / t).is_file() for t in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: the tokenizer recorded at pretraining time is not available; "
                              "run `python -m pretrain.export CKPT OUT --vocab VOCAB_DIR` and pass OUT")
    return out


def check_hf_dir(path: str | Path) -> Path:
    """Raise :class:`CheckpointError` unless ``path`` is a complete Hugging Face model directory."""
    path = Path(path)
    expected = (f"expected a Hugging Face model directory with config.json, weights "
                f"({' or '.join(WEIGHT_FILES[::2])}) and tokenizer files "
                f"({' or '.join(TOKENIZER_FILES)})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; {expected}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        missing.append("weights")
    if not any((path / t).is_file() for t in TOKENIZER_FILES):
        missing.append("tokenizer files")
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}; {expected}")
    return path


def load_model(path: str | Path):
    """Return ``(model, tokenizer)``: a QA model (fresh span head if the checkpoint has none) and
    its fast tokenizer (offsets are needed to map answers back to characters).

    The model is always fp32, whatever dtype the checkpoint was saved in: the DeepSpeed config
    decides the training precision (bf16/fp16 keep fp32 masters). transformers 5 keeps a
    checkpoint's stored dtype, so an fp16 file would otherwise train in plain fp16, where an
    update of lr 1e-4 mostly rounds away."""
    import torch
    import transformers
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    path = Path(path)
    if path.is_dir() and _looks_like_deepspeed(path):
        path = export_deepspeed(path)
    path = check_hf_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.is_fast:
        raise CheckpointError(f"{path}: tokenizer {type(tokenizer).__name__} is not a fast "
                              f"tokenizer; character offsets need tokenizer.json or a vocab.txt "
                              f"that transformers can convert")
    try:
        from packaging.version import Version

        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"  # renamed in 4.56
        model = AutoModelForQuestionAnswering.from_pretrained(path, **{key: torch.float32})
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot build a question-answering model from it ({e})") from e
    return model, tokenizer
