"""Corpus preprocessing for BERT pretraining: raw text -> balanced, memory-mappable shards.

CLI: ``python -m data_prep {vocab,build,inspect,embedded-corpus} --help``. Training reads the shards
with :class:`PretrainingDataset` and :class:`DistributedPretrainingSampler` (imported lazily, so the
CLI does not pay for importing torch).
"""
from .config import BuildConfig
from .pipeline import build
from .readers import DataPrepError
from .vocab import load_vocab, train_vocab

__all__ = ["BuildConfig", "DataPrepError", "build", "PretrainingDataset", "DistributedPretrainingSampler",
           "load_vocab", "train_vocab"]


def __getattr__(name):
    if name in ("PretrainingDataset", "DistributedPretrainingSampler"):
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
