"""Training and held-out data from a data_prep output directory.

data_prep splits by document: its manifest's ``split`` names the shards that hold the held-out
documents, which feed no training sample (``data_prep build --heldout-shards``). Those shards give
the periodic held-out MLM loss (``pretrain.validation_shards: 0`` turns the evaluation off; they
are never trained on either way). Data built before the split existed has none: there the last
``validation_shards`` shards are held out, with a warning that their documents also feed
training samples. The rest is read through :class:`data_prep.DistributedPretrainingSampler`, so
each rank trains on its own equal slice in a seeded order and a checkpoint can record the exact
position to resume from. With ``pretrain.packing: ffd`` the DataLoader workers lay each
micro-batch out in packed rows (:class:`pretrain.packing.Packer`); the sampler, its position and
the micro-batch (in samples) are the same either way. The held-out evaluation stays padded.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from data_prep import DistributedPretrainingSampler, PretrainingDataset

from .config import ConfigError, PretrainConfig
from .distributed import launcher_rank
from .packing import Packer
from .stop import ignore_in_worker


@dataclass
class DataInfo:
    path: Path
    manifest: dict
    vocab_size: int
    vocab_dir: Optional[Path]


def inspect(cfg: PretrainConfig, source: str) -> DataInfo:
    """Read the manifest and check it against the config, with messages that say what to fix."""
    path = Path(cfg.data)
    mfile = path / "manifest.json"
    if not path.is_dir():
        raise ConfigError(f"{source}: pretrain.data {path} does not exist (run `python -m data_prep build` first)")
    if not mfile.is_file():
        hint = ""
        subs = sorted(p.name for p in path.glob("seq*") if (p / "manifest.json").is_file())
        if subs:
            hint = f"; it holds {', '.join(subs)}: point pretrain.data at {path / subs[0]}"
        raise ConfigError(f"{source}: {mfile} not found, {path} is not a data_prep seq-len directory{hint}")
    manifest = json.loads(mfile.read_text())
    if manifest["seq_len"] != cfg.seq_len:
        raise ConfigError(f"{source}: pretrain.seq_len is {cfg.seq_len} but {path} holds seq_len "
                          f"{manifest['seq_len']} samples (phase {cfg.phase}); use the matching data directory")
    if manifest["max_predictions_per_seq"] < cfg.max_predictions and manifest["masking"] == "static":
        raise ConfigError(f"{source}: pretrain.max_predictions {cfg.max_predictions} exceeds the "
                          f"{manifest['max_predictions_per_seq']} static masks stored in {path}")
    vocab = manifest.get("vocab", {})
    vocab_dir = None
    rel = vocab.get("path")
    if rel:
        for base in (path, path.parent):
            if (base / rel).exists():
                vocab_dir = (base / rel).resolve()
                if vocab_dir.is_file():
                    vocab_dir = vocab_dir.parent
                break
    if "split" not in manifest and cfg.validation_shards >= manifest["num_shards"]:
        raise ConfigError(f"{source}: pretrain.validation_shards {cfg.validation_shards} leaves no training "
                          f"shard out of {manifest['num_shards']} in {path}")
    return DataInfo(path=path, manifest=manifest, vocab_size=int(vocab["size"]), vocab_dir=vocab_dir)


def heldout_shards(info: DataInfo, cfg: PretrainConfig) -> tuple[list[int], bool]:
    """(held-out shards, whether they hold documents of their own)."""
    n = info.manifest["num_shards"]
    split = info.manifest.get("split")
    if split is not None:
        return list(split["heldout_shards"]), split["method"] == "documents"
    return list(range(n - cfg.validation_shards, n)), False


def datasets(info: DataInfo, cfg: PretrainConfig) -> tuple[PretrainingDataset, Optional[PretrainingDataset]]:
    n = info.manifest["num_shards"]
    held, by_document = heldout_shards(info, cfg)
    talk = launcher_rank() == 0
    if held and not by_document and talk:
        print(f"pretrain: {info.path} has no document split (built before data_prep split by document): its last "
              f"{len(held)} shard(s) are held out, but their documents also feed training samples; rebuild for a "
              "clean held-out loss", flush=True)
    if not held and cfg.validation_shards and talk:
        print(f"pretrain: {info.path} was built with --heldout-shards 0: no held-out evaluation", flush=True)
    train = PretrainingDataset(info.path, seed=cfg.seed, max_predictions=cfg.max_predictions,
                               shards=[k for k in range(n) if k not in held])
    val = None
    if held and cfg.validation_shards:
        val = PretrainingDataset(info.path, seed=cfg.seed, max_predictions=cfg.max_predictions, shards=held)
    return train, val


def packer(cfg: PretrainConfig, dataset: PretrainingDataset, micro_batch: int) -> Optional[Packer]:
    """The ``collate_fn`` that packs micro-batches (``pretrain.packing``), or None: padded rows."""
    if cfg.packing == "off":
        return None
    return Packer(seq_len=cfg.seq_len, pack_len=cfg.pack_len or cfg.seq_len, micro_batch=micro_batch,
                  pad_id=dataset.pad_id, buckets=cfg.pack_buckets)


class TrainStream:
    """Endless micro-batches for one rank, epoch after epoch, with a resumable position."""

    def __init__(self, dataset: PretrainingDataset, micro_batch: int, world: int, rank: int, seed: int,
                 num_workers: int, pin_memory: bool = False, collate_fn: Optional[Callable] = None) -> None:
        self.dataset, self.micro_batch, self.num_workers = dataset, micro_batch, num_workers
        self.pin_memory = pin_memory  # page-locked batches: the copy to a GPU overlaps compute
        self.collate_fn = collate_fn  # runs in the workers: a Packer packs there, off the training step
        self.sampler = DistributedPretrainingSampler(dataset, world, rank, seed=seed)
        if self.sampler.per_rank < micro_batch:
            raise ConfigError(f"{dataset.path}: {len(dataset)} training samples give each of {world} ranks "
                              f"{self.sampler.per_rank}, fewer than one micro batch of {micro_batch}")
        self.consumed = 0  # samples of this rank's slice used in the current epoch
        self._iter: Optional[Iterator] = None
        self._wait = 0.0  # seconds next() blocked since take_wait(): the loader not keeping up

    def take_wait(self) -> float:
        """Seconds this process waited for batches since the last call (worker start-up included)."""
        wait, self._wait = self._wait, 0.0
        return wait

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self.consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.consumed = self.sampler.start_index
        self._iter = None

    def _start_epoch(self) -> None:
        self.dataset.set_epoch(self.sampler.epoch)
        loader = DataLoader(self.dataset, batch_size=self.micro_batch, sampler=self.sampler, drop_last=True,
                            num_workers=self.num_workers, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None, pin_memory=self.pin_memory,
                            collate_fn=self.collate_fn,
                            worker_init_fn=ignore_in_worker,  # a stop signal is the rank's to handle
                            # its own generator: creating an iterator must not draw from the global
                            # RNG (dropout), or a resumed run would not repeat the same masks
                            generator=torch.Generator().manual_seed(0))
        self._iter = iter(loader)

    def next(self) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        try:
            return self._next()
        finally:
            self._wait += time.perf_counter() - t

    def _next(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)
                self.consumed += self.micro_batch
                return batch
            except StopIteration:
                self.sampler.set_epoch(self.sampler.epoch + 1, 0)
                self.consumed = 0
                self._iter = None
        raise RuntimeError("training data yielded no batch in a whole epoch")

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def upcoming_lengths(self, samples: int) -> list[int]:
        """Real tokens of (up to) the next ``samples`` samples of this epoch, in training order,
        read from the shards without drawing a batch (the start line's fill estimate)."""
        idx = self.sampler.indices()[self.consumed:self.consumed + samples]
        return [len(self.dataset.raw(int(i))["tokens"]) for i in idx]


def validation_batches(dataset: PretrainingDataset, micro_batch: int, samples: int, world: int, rank: int):
    """A fixed held-out subset (same every evaluation), split evenly over ranks."""
    n = min(samples, len(dataset))
    idx = list(range(rank, n - n % world, world))
    dataset.set_epoch(0)  # fixed masks: evaluations are comparable over time
    for i in range(0, len(idx), micro_batch):
        items = [dataset[j] for j in idx[i:i + micro_batch]]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}
