"""Reading shards for training: a map-style dataset and a resumable distributed sampler."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import shardio
from .samples import MaskSpec, mask_sample


class PretrainingDataset(Dataset):
    """Samples of one `data_prep build` output directory (e.g. ``OUT/seq128``), as tensors.

    Items are dicts of equal-shape tensors (so the default collate stacks them):
    ``input_ids``, ``token_type_ids``, ``attention_mask`` (int64, length seq_len, padded with 0),
    ``masked_lm_positions`` (int64, length max_predictions, padded with 0), ``masked_lm_labels``
    (int64, padded with -1), ``next_sentence_label`` (int64 scalar; 0 = B follows A, 1 = random B
    for NSP or swapped segments for SOP).

    Shards are memory-mapped on first access in each process (DataLoader workers included), so
    ranks and workers share the page cache instead of each loading the corpus. With dynamic
    masking, the masks of item ``i`` in epoch ``e`` come from an RNG seeded by (seed, e, i): every
    epoch differs, and any epoch can be replayed exactly.

    ``shards`` restricts the dataset to those shard numbers (e.g. hold the last one out for
    validation); indices then run over the chosen shards only.
    """

    def __init__(self, path: str | Path, *, epoch: int = 0, seed: int | None = None,
                 max_predictions: int | None = None, mask_prob: float | None = None,
                 whole_word_mask: bool | None = None, shards: Sequence[int] | None = None):
        self.path = Path(path)
        mfile = self.path / "manifest.json"
        if not mfile.is_file():
            raise FileNotFoundError(f"{mfile}: no manifest; is {self.path} a data_prep build output "
                                    f"(e.g. OUT/seq128) and did the build finish?")
        self.manifest = json.loads(mfile.read_text())
        m = self.manifest
        self.seq_len: int = m["seq_len"]
        self.masking: str = m["masking"]
        self.seed = m["seed"] if seed is None else seed
        self.epoch = epoch
        self.max_predictions = max_predictions or m["max_predictions_per_seq"]
        if self.masking == "static" and self.max_predictions < m["max_predictions_per_seq"]:
            raise ValueError(f"{self.path}: static masks hold up to {m['max_predictions_per_seq']} predictions; "
                             f"max_predictions={self.max_predictions} would cut them")
        all_shards = m["shards"]
        chosen = range(len(all_shards)) if shards is None else list(shards)
        bad = [k for k in chosen if not 0 <= k < len(all_shards)]
        if bad or (shards is not None and not chosen):
            raise ValueError(f"{self.path}: shards {bad or '[]'} not in 0..{len(all_shards) - 1}")
        self._files = [all_shards[k]["path"] for k in chosen]
        self._counts = np.array([all_shards[k]["num_samples"] for k in chosen], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])
        self._shards: list = [None] * len(self._counts)
        vocab_file = self.vocab_dir / "vocab.txt"
        tokens = vocab_file.read_text(encoding="utf-8").splitlines() if vocab_file.is_file() else None
        ids = m["vocab"]["special_ids"]
        self.vocab_size: int = m["vocab"]["size"]
        self.pad_id = ids["[PAD]"]
        if tokens is None:  # the vocab copy went missing: masking still works, without whole words
            tokens = [""] * self.vocab_size
        self.mask_spec = MaskSpec.from_tokens(
            tokens, ids["[MASK]"], ids.values(), mask_prob=mask_prob or m["mask_prob"],
            max_predictions=self.max_predictions,
            whole_word=m["whole_word_mask"] if whole_word_mask is None else whole_word_mask)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def vocab_dir(self) -> Path:
        """The vocab copied next to the data (vocab.txt + tokenizer files, for export)."""
        return (self.path / self.manifest["vocab"]["path"]).resolve()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose dynamic masks items get (no effect with static masks)."""
        self.epoch = int(epoch)

    def __getstate__(self):  # memory maps are reopened in the receiving process
        state = self.__dict__.copy()
        state["_shards"] = [None] * len(self._counts)
        return state

    def _shard(self, k: int) -> dict:
        if self._shards[k] is None:
            arrays, _ = shardio.open_arrays(self.path / self._files[k])
            self._shards[k] = arrays
        return self._shards[k]

    def raw(self, index: int) -> dict:
        """The stored sample (numpy, unpadded, masks not applied for dynamic data)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        j = index - int(self._starts[k])
        a = self._shard(k)
        lo, hi = a["offsets"][j], a["offsets"][j + 1]
        out = {"tokens": np.asarray(a["tokens"][lo:hi]), "a_len": int(a["a_len"][j]), "label": int(a["label"][j]),
               "doc": int(a["doc"][j])}
        if "mask_offsets" in a:
            mlo, mhi = a["mask_offsets"][j], a["mask_offsets"][j + 1]
            out["mask_pos"] = np.asarray(a["mask_pos"][mlo:mhi])
            out["mask_label"] = np.asarray(a["mask_label"][mlo:mhi])
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = self.raw(index)
        tokens = r["tokens"].astype(np.int64)
        if self.masking == "dynamic":
            rng = np.random.default_rng([self.seed, self.epoch, index % len(self)])
            tokens, pos, lab = mask_sample(tokens, rng, self.mask_spec)
        else:
            pos, lab = r["mask_pos"], r["mask_label"]
        n, L, P = len(tokens), self.seq_len, self.max_predictions
        input_ids = np.full(L, self.pad_id, np.int64)
        input_ids[:n] = tokens
        token_type = np.zeros(L, np.int64)
        token_type[r["a_len"]:n] = 1
        attention = np.zeros(L, np.int64)
        attention[:n] = 1
        positions = np.zeros(P, np.int64)
        positions[:len(pos)] = pos
        labels = np.full(P, -1, np.int64)
        labels[:len(lab)] = lab
        return {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_type),
                "attention_mask": torch.from_numpy(attention), "masked_lm_positions": torch.from_numpy(positions),
                "masked_lm_labels": torch.from_numpy(labels),
                "next_sentence_label": torch.tensor(r["label"], dtype=torch.int64)}


class DistributedPretrainingSampler(Sampler[int]):
    """Each rank gets a disjoint slice of equal length of a seeded permutation of the dataset.

    The permutation depends on (seed, epoch) only, so all ranks agree without communicating. The
    last ``len % num_replicas`` indices of each epoch's permutation are dropped (a different set
    every epoch) so every rank takes the same number of steps. Resume: ``start_index`` (or
    ``load_state_dict``) skips the first samples of this rank's slice for the current epoch.

    With a DataLoader the sampler runs ahead of training (prefetch), so save
    ``state_dict(consumed=samples_this_rank_trained_on_this_epoch)`` rather than relying on the
    count of indices already handed out.
    """

    def __init__(self, dataset_or_len, num_replicas: int | None = None, rank: int | None = None, *,
                 seed: int = 0, shuffle: bool = True, epoch: int = 0, start_index: int = 0):
        n = dataset_or_len if isinstance(dataset_or_len, int) else len(dataset_or_len)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        if n < num_replicas:
            raise ValueError(f"{n} samples cannot give each of {num_replicas} ranks one")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.seed, self.shuffle, self.epoch = seed, shuffle, epoch
        self.per_rank = n // num_replicas
        self.start_index = self._check_start(start_index)
        self._yielded = start_index

    def _check_start(self, start: int) -> int:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start_index {start} not in [0, {self.per_rank}] (samples per rank per epoch)")
        return int(start)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_index = self._check_start(start_index)
        self._yielded = self.start_index

    def indices(self) -> np.ndarray:
        """This rank's whole slice for the current epoch (ignoring start_index)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        return order[self.rank:self.per_rank * self.num_replicas:self.num_replicas]

    def __iter__(self):
        idx = self.indices()
        for i in range(self.start_index, self.per_rank):
            self._yielded = i + 1
            yield int(idx[i])

    def __len__(self) -> int:
        return self.per_rank - self.start_index

    def state_dict(self, consumed: int | None = None) -> dict:
        """Position to resume from: epoch and samples of this rank's slice already used."""
        pos = self._yielded if consumed is None else int(consumed)
        return {"epoch": self.epoch, "start_index": pos, "seed": self.seed, "num_replicas": self.num_replicas,
                "num_samples": self.n}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``, also one saved by another number of ranks: rank r takes
        samples r, r + R, r + 2R, ... of the epoch's permutation, so after k samples on each of R
        ranks the first k * R are used, whatever R; on R' ranks that is k * R / R' each. Exact
        while whole global batches (multiples of R and R') were consumed in the epoch; after an
        epoch that ended inside a step it is rounded down, and fewer than R' samples of the epoch
        are seen twice."""
        if state.get("num_samples", self.n) != self.n:
            raise ValueError(f"sampler state is for {state.get('num_samples')} samples; this run has {self.n}: "
                             "positions would not match")
        start = int(state["start_index"])
        saved = int(state.get("num_replicas", self.num_replicas))
        if saved != self.num_replicas:
            start = start * saved // self.num_replicas
        self.seed = state.get("seed", self.seed)
        self.set_epoch(state["epoch"], start)
