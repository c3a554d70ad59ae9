"""Loading the encoder to fine-tune: one entry point, ``load_model(path)``.

Today it accepts a Hugging Face directory (``config.json`` + weights + tokenizer files), such as
``pretrain.export`` is to write. A DeepSpeed pretraining checkpoint is recognised and refused with
a message; its branch belongs here once the pretraining code exists (issue 4).
"""
from __future__ import annotations

from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class CheckpointError(ValueError):
    """The directory is not something we can fine-tune from; the message says what was expected."""


def _looks_like_deepspeed(path: Path) -> bool:
    return ((path / "latest").is_file() or any(path.glob("global_step*"))
            or any(path.glob("mp_rank_*_model_states.pt")))


def check_hf_dir(path: str | Path) -> Path:
    """Raise :class:`CheckpointError` unless ``path`` is a complete Hugging Face model directory."""
    path = Path(path)
    expected = (f"expected a Hugging Face model directory with config.json, weights "
                f"({' or '.join(WEIGHT_FILES[::2])}) and tokenizer files "
                f"({' or '.join(TOKENIZER_FILES)})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; {expected}")
    if _looks_like_deepspeed(path):
        raise CheckpointError(
            f"{path}: this looks like a DeepSpeed pretraining checkpoint; loading those directly "
            f"is not implemented yet (needs the pretrain package) -- export it to a Hugging Face "
            f"directory first; {expected}")
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
    its fast tokenizer (offsets are needed to map answers back to characters)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    path = check_hf_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.is_fast:
        raise CheckpointError(f"{path}: tokenizer {type(tokenizer).__name__} is not a fast "
                              f"tokenizer; character offsets need tokenizer.json or a vocab.txt "
                              f"that transformers can convert")
    try:
        model = AutoModelForQuestionAnswering.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot build a question-answering model from it ({e})") from e
    return model, tokenizer
