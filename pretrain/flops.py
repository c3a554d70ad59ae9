"""FLOPs of BERT pretraining, counted as PaLM counts them (Chowdhery et al. 2022, "PaLM: Scaling
Language Modeling with Pathways", arXiv 2204.02311, appendix B), the count behind NVIDIA's and
MLPerf's BERT throughput figures.

A matmul with a weight of N parameters costs 2N FLOPs per row in the forward pass and 4N in the
backward (the gradients of input and weight): 6N per row for training. Attention adds, per layer
and per (query, key) pair, 2h for QK^T and 2h for the weighted sum of V, three times over with the
backward: 12h. Element-wise work (softmax, GELU, LayerNorm, dropout) is not counted. So, for a
model of L layers of width h:

* per token:              6 x the encoder layers' parameters (embeddings are lookups, not counted)
* per (token, key) pair:  12 L h, where a token's keys are the positions it attends over (the
                          row's seq_len when rows are padded; its own sample when packed)
* per predicted position: 6 x the MLM head's parameters (transform, LayerNorm, vocab projection:
                          the decoder weight is the tied word embedding, but it is a matmul here)
* per sample:             6 x the pooler's and the NSP/SOP classifier's parameters

``mfu`` counts this on the real (non-padding) tokens and the real masked positions; ``hfu`` counts
what the accelerator executed: every position of every row, attention over the full row, and every
masked-position slot the MLM head computes (real or not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


def encoder_layer_params(cfg) -> int:
    """Parameters of one encoder layer of an HF ``BertConfig``: Q, K, V and output projections,
    the FFN's two matmuls, two LayerNorms (weights and biases throughout)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    attention = 4 * (h * h + h) + 2 * h
    ffn = (h * f + f) + (f * h + h) + 2 * h
    return attention + ffn


def mlm_head_params(cfg) -> int:
    """The MLM head: transform dense + LayerNorm, then the vocab projection (its weight tied to the
    word embeddings) and its bias."""
    h, v = cfg.hidden_size, cfg.vocab_size
    return (h * h + h) + 2 * h + (h * v + v)


def sample_head_params(cfg) -> int:
    """Per sample: the pooler (dense on the [CLS] state) and the 2-way NSP/SOP classifier."""
    h = cfg.hidden_size
    return (h * h + h) + (2 * h + 2)


@dataclass(frozen=True)
class FlopRates:
    """Training FLOPs (forward + backward) per unit of work."""

    token: float       # per token through the encoder
    attention: float   # per (token, attended position) pair
    masked: float      # per masked (predicted) position
    sample: float      # per sample (pooler + NSP)

    @classmethod
    def of(cls, cfg) -> "FlopRates":
        return cls(token=6.0 * cfg.num_hidden_layers * encoder_layer_params(cfg),
                   attention=12.0 * cfg.num_hidden_layers * cfg.hidden_size,
                   masked=6.0 * mlm_head_params(cfg), sample=6.0 * sample_head_params(cfg))

    def per_token(self, attended: float) -> float:
        """FLOPs of one token attending over ``attended`` positions (heads not included)."""
        return self.token + self.attention * attended

    def total(self, tokens: float, pairs: float, masked: float, samples: float) -> float:
        """FLOPs of ``tokens`` tokens, ``pairs`` = sum over them of the positions each attends over
        (sum over samples of len_i x attended_len_i), ``masked`` predicted positions and ``samples``."""
        return self.token * tokens + self.attention * pairs + self.masked * masked + self.sample * samples

    def model_flops(self, work: Mapping[str, float]) -> float:
        """The useful work of an interval (see :func:`batch_work`): real tokens and predictions."""
        return self.total(work["tokens"], work["pairs"], work["masked"], work["samples"])

    def executed_flops(self, work: Mapping[str, float]) -> float:
        """What was executed: padding positions, attention over whole rows, every MLM slot."""
        return self.total(work["positions"], work["pairs_executed"], work["masked_slots"], work["samples"])


def batch_work(batch: Mapping[str, torch.Tensor], masked: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """The work of one micro-batch, padded or packed (``pretrain/packing.py``), without reading
    anything back from the device.

    Returns a device tensor [real tokens, pairs, real masked positions] (``masked``: the model's
    count of real predictions, ``mlm_count``) and the counts the shapes give on the host: samples,
    positions, pairs_executed, masked_slots. A padded row's real tokens attend over the whole row
    (its padding is masked out, but the row is its length): pairs = tokens x seq_len. A packed
    token attends over its own sample: pairs = sum of len_i². Executed: every position of every row
    attends over the whole row (the attention kernel computes the masked-out pairs too)."""
    rows, seq = batch["input_ids"].shape
    if "sample_lengths" in batch:  # packed
        lengths = batch["sample_lengths"].to(torch.float64)
        tokens, pairs = lengths.sum(), lengths.square().sum()
    else:
        tokens = batch["attention_mask"].sum(dtype=torch.float64)
        pairs = tokens * seq
    device = torch.stack([tokens, pairs, masked.to(torch.float64)])
    host = {"samples": batch["masked_lm_labels"].shape[0], "positions": rows * seq,
            "pairs_executed": rows * seq * seq, "masked_slots": batch["masked_lm_labels"].numel()}
    return device, host


__all__ = ["FlopRates", "batch_work", "encoder_layer_params", "mlm_head_params", "sample_head_params"]
