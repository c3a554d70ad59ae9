"""Typed build options (the CLI fills this; Python callers can too)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .readers import FORMATS, DataPrepError


@dataclass
class BuildConfig:
    inputs: list[str]
    vocab: str
    output: str
    seq_lens: tuple[int, ...] = (128, 512)
    shards: int = 64
    heldout_shards: int = 1  # the last N shards hold whole documents that no training sample touches
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 12345
    masking: str = "dynamic"  # "static": masks drawn here and stored; "dynamic": drawn at load time
    dupe_factor: int | None = None  # None: 1 for dynamic, 5 for static (NVIDIA's recipe)
    pair_task: str = "nsp"
    whole_word_mask: bool = False
    fmt: str = "auto"
    short_seq_prob: float = 0.1
    mask_prob: float = 0.15
    max_predictions: tuple[int, ...] | None = None  # per seq len; None: 20 at 128, 80 at 512
    min_doc_chars: int | None = None  # None: 200 for wiki (drops stubs), 0 otherwise
    max_doc_chars: int = 4_000_000
    max_line_chars: int = 1_000_000
    text_key: str = "text"
    lowercase: bool | None = None  # None: from the vocab's tokenizer_config.json
    keep_work: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        self.seq_lens = tuple(int(s) for s in self.seq_lens)
        if not self.inputs:
            raise DataPrepError("no --input given")
        if not self.seq_lens or any(s < 8 or s > 65535 for s in self.seq_lens):
            raise DataPrepError(f"--seq-lens {self.seq_lens}: each must be between 8 and 65535")
        if len(set(self.seq_lens)) != len(self.seq_lens):
            raise DataPrepError(f"--seq-lens {self.seq_lens}: repeated value")
        if self.shards < 1:
            raise DataPrepError(f"--shards {self.shards}: must be at least 1")
        if not 0 <= self.heldout_shards < self.shards:
            raise DataPrepError(f"--heldout-shards {self.heldout_shards}: must be between 0 and --shards - 1 "
                                f"({self.shards - 1})")
        if self.workers < 1:
            raise DataPrepError(f"--workers {self.workers}: must be at least 1")
        if self.masking not in ("static", "dynamic"):
            raise DataPrepError(f"--masking {self.masking!r}: choose static or dynamic")
        if self.pair_task not in ("nsp", "sop"):
            raise DataPrepError(f"--pair-task {self.pair_task!r}: choose nsp or sop")
        if self.fmt not in FORMATS:
            raise DataPrepError(f"--format {self.fmt!r}: choose from {', '.join(FORMATS)}")
        if self.dupe_factor is None:
            self.dupe_factor = 5 if self.masking == "static" else 1
        if self.dupe_factor < 1:
            raise DataPrepError(f"--dupe-factor {self.dupe_factor}: must be at least 1")
        if not 0 < self.mask_prob < 1:
            raise DataPrepError(f"--mask-prob {self.mask_prob}: must be in (0, 1)")
        if not 0 <= self.short_seq_prob <= 1:
            raise DataPrepError(f"--short-seq-prob {self.short_seq_prob}: must be in [0, 1]")
        if self.max_predictions is not None:
            self.max_predictions = tuple(int(m) for m in self.max_predictions)
            if len(self.max_predictions) != len(self.seq_lens) or min(self.max_predictions) < 1:
                raise DataPrepError(f"--max-predictions {self.max_predictions}: give one positive value per seq len "
                                    f"{self.seq_lens}")

    def to_dict(self) -> dict:
        return asdict(self)
