"""Packed sequences: several samples per row of positions, with the math of the padded batch.

At seq 128 most samples hold ~110 real tokens: a padded micro-batch computes 10-15% padding, and
at seq 512 (where short samples are more common) much more. Packing lays one micro-batch's M
samples out in R rows of ``pack_len`` positions instead of M rows of ``seq_len``, each sample
kept whole and contiguous:

* position ids restart at 0 for every sample (the position embeddings see the indices they see
  unpacked, so ``pack_len`` may exceed ``max_position_embeddings``);
* every position carries the id of its sample (-1 for padding); the model builds from them a
  block-diagonal attention mask, so no token attends across samples;
* the per-sample tensors keep their (M, ...) layout and order: MLM labels (M, P), the NSP/SOP
  label (M,); the masked positions become flat indices into the R x pack_len positions, and
  ``cls_positions`` (M,) point at each sample's [CLS] for the pooler.

With dropout off the losses and gradients are those of the padded batch up to float rounding
(``tests/test_packing.py``). What is per sample stays per sample: the sampler and its resume
position, the micro-batch size (M samples), the global batch, the LR schedule and the gradient
noise scale do not know about rows. A packed step is the padded step on fewer positions.

The packer is first-fit-decreasing (Johnson 1973; the "FFD" baseline of Krell et al. 2021,
"Efficient Sequence Packing without Cross-contamination", arXiv 2107.02027) over one
micro-batch: samples longest first (ties by their place in the micro-batch), each into the first
row with room, a new row when none has. It is a pure function of the micro-batch, so a resumed
run packs its batches exactly as the uninterrupted run did. R varies from batch to batch; it is
padded up to a multiple of ``ceil(max_rows / buckets)`` rows so a compiled model sees at most
``buckets`` shapes (in practice a few: R varies little for a given micro-batch). Padding rows hold
no sample and carry no label. Measured on data_prep shards of the wiki + books sample (seq 512,
32 samples per micro-batch, rows of 512: padded fill 0.75, FFD 0.957 unrounded), 8 buckets would
round most micro-batches up towards max_rows (R lands within ~30% of it: fill 0.90), 32 keep
FFD's fill (0.957, 11 distinct row counts seen).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

BUCKETS = 32  # default most distinct row counts per (micro-batch, pack_len): few shapes for a compiled model


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices: each sample in exactly one row, no row over ``capacity`` tokens.

    Samples go longest first (ties: lower index first) into the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"sample {i} has {n} tokens; rows hold 1..{capacity}")
        for r, room in enumerate(free):
            if n <= room:
                break
        else:
            r = len(rows)
            rows.append([])
            free.append(capacity)
        rows[r].append(i)
        free[r] -= n
    return rows


def max_rows(micro_batch: int, seq_len: int, pack_len: int) -> int:
    """The most rows FFD needs for ``micro_batch`` samples of at most ``seq_len`` tokens.

    First fit opens a row only when no open row has room for a sample of <= seq_len tokens, so
    every row but the last holds more than pack_len - seq_len tokens, i.e. at least
    k = pack_len // seq_len samples: at most ceil(M / k) rows."""
    return math.ceil(micro_batch / (pack_len // seq_len))


def bucket_rows(rows: int, micro_batch: int, seq_len: int, pack_len: int, buckets: int = BUCKETS) -> int:
    """``rows`` rounded up to a multiple of ceil(max_rows / buckets), and never 1 where more rows
    can occur: torch.compile specialises a dynamic dimension of size 1, so a lone one-row batch
    would compile a second graph."""
    most = max_rows(micro_batch, seq_len, pack_len)
    step = math.ceil(most / buckets)
    return max(math.ceil(rows / step) * step, min(2, most))


@dataclass(frozen=True)
class Packer:
    """A DataLoader ``collate_fn``: dataset items (data_prep's padded samples) -> a packed batch.

    Keys of the batch (R rows of ``pack_len``, M samples of at most P predictions):

    * ``input_ids``, ``token_type_ids``, ``position_ids`` (R, pack_len): padding positions hold
      ``pad_id``, 0 and 0;
    * ``sample_ids`` (R, pack_len): the sample (0..M-1) each position belongs to, -1 for padding;
    * ``masked_lm_positions`` (M, P): flat indices into the R * pack_len positions (padding slots
      point at their sample's [CLS]), ``masked_lm_labels`` (M, P) as unpacked (-1: no label);
    * ``next_sentence_label`` (M,), ``cls_positions`` (M,) the flat index of each sample's [CLS];
    * ``sample_lengths`` (M,): real tokens per sample (the FLOP count: a packed token attends
      over its own sample).
    """

    seq_len: int
    pack_len: int
    micro_batch: int
    pad_id: int = 0
    buckets: int = BUCKETS

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return self.pack(batch)

    def pack(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pack a padded batch (the keys of ``data_prep.PretrainingDataset`` items, stacked)."""
        real = batch["attention_mask"].bool()                    # (M, L): a prefix of each row
        lengths = real.sum(1)
        n = lengths.tolist()
        rows = first_fit_decreasing(n, self.pack_len)
        n_rows = bucket_rows(len(rows), self.micro_batch, self.seq_len, self.pack_len, self.buckets)
        first = [0] * len(n)                                      # flat index of each sample's [CLS]
        for r, members in enumerate(rows):
            offset = r * self.pack_len
            for i in members:
                first[i] = offset
                offset += n[i]
        start = torch.tensor(first, dtype=torch.int64)
        m, seq = real.shape
        dest = (start[:, None] + torch.arange(seq))[real]         # flat index of every real token
        size = n_rows * self.pack_len

        def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
            flat = torch.full((size,), fill, dtype=torch.int64)
            flat[dest] = values[real]
            return flat.view(n_rows, self.pack_len)

        return {"input_ids": scatter(batch["input_ids"], self.pad_id),
                "token_type_ids": scatter(batch["token_type_ids"], 0),
                "position_ids": scatter(torch.arange(seq).expand(m, seq), 0),
                "sample_ids": scatter(torch.arange(m)[:, None].expand(m, seq), -1),
                "masked_lm_positions": start[:, None] + batch["masked_lm_positions"],
                "masked_lm_labels": batch["masked_lm_labels"],
                "next_sentence_label": batch["next_sentence_label"],
                "cls_positions": start,
                "sample_lengths": lengths}


def fill_rate(lengths: Sequence[int], micro_batch: int, seq_len: int, pack_len: int | None,
              buckets: int = BUCKETS) -> float:
    """Real tokens / positions computed when ``lengths`` (samples in training order) are cut into
    micro-batches of ``micro_batch`` and padded (``pack_len`` None) or packed into bucketed rows."""
    tokens = positions = 0
    for i in range(0, len(lengths) - micro_batch + 1, micro_batch):
        chunk = lengths[i:i + micro_batch]
        tokens += sum(chunk)
        if pack_len is None:
            positions += micro_batch * seq_len
        else:
            rows = len(first_fit_decreasing(chunk, pack_len))
            positions += bucket_rows(rows, micro_batch, seq_len, pack_len, buckets) * pack_len
    return tokens / positions if positions else float("nan")


__all__ = ["BUCKETS", "Packer", "bucket_rows", "fill_rate", "first_fit_decreasing", "max_rows"]
