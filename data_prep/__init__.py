"""Corpus preprocessing for BERT pretraining: raw text -> balanced, memory-mappable shards.

CLI: ``python -m data_prep {vocab,build,inspect,embedded-corpus} --help``. Training reads the shards
with :class:`PretrainingDataset` and :class:`DistributedPretrainingSampler` (imported lazily, so the
CLI does not pay for importing torch).
"""
from .config import BuildConfig
from .readers import DataPrepError

__all__ = ["BuildConfig", "DataPrepError", "build", "PretrainingDataset", "DistributedPretrainingSampler",
           "load_vocab", "train_vocab"]


def __getattr__(name):
    if name in ("PretrainingDataset", "DistributedPretrainingSampler"):
        from . import dataset

        return getattr(dataset, name)
    if name == "build":
        from .build import build

        return build
    if name in ("load_vocab", "train_vocab"):
        from . import vocab

        return getattr(vocab, name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
