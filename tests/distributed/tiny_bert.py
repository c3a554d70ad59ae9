"""The small BERT and fixed data shared by the ZeRO equivalence worker and its reference."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

GLOBAL_BATCH = 8
STEPS = 5
SEQ = 16
VOCAB = 96


def make_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg)


def batches() -> list[dict[str, torch.Tensor]]:
    """Every position is a label, so each micro-batch's mean loss weighs samples equally."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": torch.roll(ids, 1, dims=1)})
    return out
