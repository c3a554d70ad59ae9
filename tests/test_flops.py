"""The FLOP count behind ``mfu`` and ``hfu`` (pretrain/flops.py) against counts made by hand here,
for bert-tiny and BERT-Large shapes; the peak table against the names GPUs report; and the ``mfu``
a real run writes to metrics.jsonl against the formula on the counts it logs beside it."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import BertConfig

from pretrain.flops import FlopRates, batch_work, encoder_layer_params, mlm_head_params, sample_head_params
from pretrain.metrics import mfu_peak, peak_tflops
from pretrain.model import BertPretrainingModel

TINY = BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=30522)
LARGE = BertConfig(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                   vocab_size=30522)

# By hand, weight + bias of each matmul, LayerNorm gain + bias:
#   tiny layer:  Q,K,V,O 4 x (128·128 + 128) = 66,048; LN 256; FFN 128·512 + 512 = 66,048 and
#                512·128 + 128 = 65,664; LN 256                                  -> 198,272
#   large layer: Q,K,V,O 4 x (1024² + 1024) = 4,198,400; LN 2,048; FFN 4,198,400 and 4,195,328;
#                LN 2,048                                                         -> 12,596,224
#   MLM head:    transform h² + h, LN 2h, decoder (tied to the word embeddings) h·30522 + 30522
#                tiny 16,512 + 256 + 3,906,816 + 30,522 = 3,954,106
#                large 1,049,600 + 2,048 + 31,254,528 + 30,522 = 32,336,698
#   per sample:  pooler h² + h, NSP 2h + 2: tiny 16,512 + 258 = 16,770; large 1,049,600 + 2,050 = 1,051,650
HAND = {
    "tiny": dict(layer=198_272, mlm=3_954_106, sample=16_770,
                 token=6 * 2 * 198_272, attention=12 * 2 * 128),
    "large": dict(layer=12_596_224, mlm=32_336_698, sample=1_051_650,
                  token=6 * 24 * 12_596_224, attention=12 * 24 * 1024),
}


@pytest.mark.parametrize("name,cfg", [("tiny", TINY), ("large", LARGE)])
def test_parameter_counts_and_rates_by_hand_and_from_the_model(name, cfg):
    hand = HAND[name]
    assert encoder_layer_params(cfg) == hand["layer"]
    assert mlm_head_params(cfg) == hand["mlm"]
    assert sample_head_params(cfg) == hand["sample"]
    rates = FlopRates.of(cfg)
    assert (rates.token, rates.attention) == (hand["token"], hand["attention"])
    assert (rates.masked, rates.sample) == (6 * hand["mlm"], 6 * hand["sample"])
    # and the model as built (shapes only, on the meta device): the same counts
    with torch.device("meta"):
        model = BertPretrainingModel(cfg)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.bert.encoder) == cfg.num_hidden_layers * hand["layer"]
    assert count(model.cls.predictions) == hand["mlm"]  # the tied decoder weight counted here, once
    assert count(model.bert.pooler) + count(model.cls.seq_relationship) == hand["sample"]


def test_bert_large_per_token_at_seq_128_and_512():
    rates = FlopRates.of(LARGE)
    # 6 x 302,309,376 encoder parameters + 12·24·1024 x the positions attended over
    assert rates.per_token(128) == 1_813_856_256 + 294_912 * 128 == 1_851_604_992
    assert rates.per_token(512) == 1_813_856_256 + 294_912 * 512 == 1_964_851_200


def padded_batch(lengths: list[int], masked: list[int], seq: int = 128, slots: int = 20) -> dict:
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    labels = torch.full((len(lengths), slots), -1)
    for i, (n, m) in enumerate(zip(lengths, masked)):
        mask[i, :n] = 1
        labels[i, :m] = 7
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 100, (len(lengths), seq), generator=g) * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(mask), "masked_lm_labels": labels,
            "masked_lm_positions": torch.arange(1, slots + 1).repeat(len(lengths), 1),
            "next_sentence_label": torch.zeros(len(lengths), dtype=torch.long)}


@pytest.mark.parametrize("name,cfg", [("tiny", TINY), ("large", LARGE)])
def test_a_padded_batch(name, cfg):
    """3 rows of 128 holding 100, 60 and 128 real tokens, 15, 9 and 20 real masked positions of 20
    slots: the model FLOPs count the real ones (each attending over its row of 128), the executed
    ones every position and slot."""
    hand = HAND[name]
    batch = padded_batch([100, 60, 128], [15, 9, 20])
    mlm_count = (batch["masked_lm_labels"] >= 0).sum()  # as the model counts them
    device, host = batch_work(batch, mlm_count)
    assert device.tolist() == [288, 288 * 128, 44]
    assert host == {"samples": 3, "positions": 384, "pairs_executed": 384 * 128, "masked_slots": 60}
    work = {"tokens": 288, "pairs": 288 * 128, "masked": 44, **host}
    rates = FlopRates.of(cfg)
    want_model = 288 * (hand["token"] + 128 * hand["attention"]) + 44 * 6 * hand["mlm"] + 3 * 6 * hand["sample"]
    want_executed = 384 * (hand["token"] + 128 * hand["attention"]) + 60 * 6 * hand["mlm"] + 3 * 6 * hand["sample"]
    assert rates.model_flops(work) == want_model
    assert rates.executed_flops(work) == want_executed
    if name == "large":  # 288 x 1,851,604,992 + 44 x 194,020,188 + 3 x 6,309,900, and 384 and 60 of them
        assert (want_model, want_executed) == (541_818_055_668, 722_676_457_908)


@pytest.mark.parametrize("name,cfg", [("tiny", TINY), ("large", LARGE)])
def test_packed_lengths_attend_over_their_own_sample(name, cfg):
    """One row of 128 packing samples of 70, 40 and 18 tokens: each token attends over its own
    sample, so the attention term is 70² + 40² + 18², not 128 x 128."""
    hand = HAND[name]
    rates = FlopRates.of(cfg)
    pairs = 70 * 70 + 40 * 40 + 18 * 18
    got = rates.total(tokens=128, pairs=pairs, masked=19, samples=3)
    want = 128 * hand["token"] + 6_824 * hand["attention"] + 19 * 6 * hand["mlm"] + 3 * 6 * hand["sample"]
    assert pairs == 6_824 and got == want
    # the same samples padded, one per row of 128: the same matmuls, each token attending over 128
    padded = rates.total(tokens=128, pairs=128 * 128, masked=19, samples=3)
    assert padded - got == (128 * 128 - 6_824) * hand["attention"]


def test_the_work_of_a_packed_batch():
    """The packer's batch (pretrain/packing.py) of samples of 70, 40, 18 and 100 tokens in rows of
    128: model work from each sample's own length, executed work from the rows it fills."""
    from pretrain.packing import Packer

    padded = padded_batch([70, 40, 18, 100], [10, 6, 3, 15])
    packed = Packer(seq_len=128, pack_len=128, micro_batch=4, buckets=4).pack(padded)
    rows = packed["input_ids"].shape[0]
    assert rows == 2  # FFD: [100, 18] and [70, 40]
    device, host = batch_work(packed, (packed["masked_lm_labels"] >= 0).sum())
    assert device.tolist() == [228, 70 ** 2 + 40 ** 2 + 18 ** 2 + 100 ** 2, 34]
    assert host == {"samples": 4, "positions": 2 * 128, "pairs_executed": 2 * 128 * 128, "masked_slots": 80}
    # padded, the same samples: 4 rows, each real token attending over its row of 128
    device, host = batch_work(padded, (padded["masked_lm_labels"] >= 0).sum())
    assert device.tolist() == [228, 228 * 128, 34] and host["positions"] == 4 * 128


def test_run_5_as_the_issue_counts_it():
    """docs/gpu run 5: one H100 80GB HBM3, BERT-Large seq 128, bf16, 1,057 samples/s and 116.1k
    real tokens/s (86% of positions), 20 MLM slots of which ~16 real (15% of the ~107 non-special
    tokens): 22.1% of the bf16 peak by the model count, 25.7% executed (the former count: 27.6%)."""
    rates, peak = FlopRates.of(LARGE), peak_tflops("NVIDIA H100 80GB HBM3", "bf16") * 1e12
    samples, tokens = 1057, 116_100
    masked = 0.15 * (tokens / samples - 3) * samples
    mfu = rates.total(tokens, tokens * 128, masked, samples) / peak
    hfu = rates.total(samples * 128, samples * 128 * 128, samples * 20, samples) / peak
    assert round(mfu, 3) == 0.221 and round(hfu, 3) == 0.257


@pytest.mark.parametrize("name,bf16,fp32", [
    ("NVIDIA H100 80GB HBM3", 989.0, 67.0), ("NVIDIA H100 PCIe", 756.0, 51.0), ("NVIDIA H100 NVL", 835.0, 60.0),
    ("NVIDIA H800", 989.0, 67.0), ("NVIDIA H800 PCIe", 756.0, 51.0),
    ("NVIDIA H200", 989.0, 67.0), ("NVIDIA H200 NVL", 835.0, 60.0), ("NVIDIA GH200 480GB", 989.0, 67.0),
    ("NVIDIA B200", 2250.0, 75.0), ("NVIDIA L40", 181.0, 90.5), ("NVIDIA L40S", 362.0, 91.6), ("NVIDIA L4", 121.0, 30.3),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5), ("NVIDIA A100 80GB PCIe", 312.0, 19.5), ("NVIDIA A100-PCIE-40GB", 312.0, 19.5),
    ("Tesla V100-SXM2-32GB", 125.0, 15.7), ("Tesla V100-PCIE-16GB", 112.0, 14.0), ("Tesla T4", 65.0, 8.1),
    ("NVIDIA A10G", 70.0, 31.2), ("NVIDIA A10", 125.0, 31.2),
    ("NVIDIA GeForce RTX 4090", None, None), ("NVIDIA H20", None, None), ("NVIDIA RTX A6000", None, None),
    ("cpu", None, None),
])
def test_peak_table_by_the_names_gpus_report(name, bf16, fp32):
    assert peak_tflops(name, "bf16") == bf16
    assert peak_tflops(name, "fp16") == bf16
    assert peak_tflops(name, "fp32") == fp32


def test_an_unknown_device_turns_mfu_off_and_says_how_to_turn_it_on():
    assert mfu_peak(None, "NVIDIA GeForce RTX 4090", "bf16") == (
        None, "MFU off: no bf16 peak known for 'NVIDIA GeForce RTX 4090'; set pretrain.peak_tflops "
              "(one device's dense TFLOP/s) to log mfu and hfu")
    assert mfu_peak(400, "NVIDIA GeForce RTX 4090", "bf16") == (400.0, None)  # the setting wins
    assert mfu_peak(None, "NVIDIA H100 80GB HBM3", "bf16") == (989.0, None)


@pytest.mark.slow
def test_the_mfu_a_run_logs_is_the_formula_on_the_counts_it_logs(pretrain_work):
    """A one-process bert-tiny run on the CPU with ``pretrain.peak_tflops`` set: every record's
    mfu and hfu are the hand formula over its logged counts, time and peak, and its counts are the
    data's (rows of 128, 20 MLM slots, no more real tokens and masked positions than those)."""
    from tests.pretrain_helpers import ROOT, RUN, run

    out = run([sys.executable, str(RUN), "--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128",
               "--max-steps", "3", "--train-batch-size", "8", "--micro-batch-size", "4", "--output", "flops_run",
               "--set", "pretrain.log_every=1", "--set", "pretrain.peak_tflops=0.05",
               "--set", "pretrain.eval_samples=16"], pretrain_work)
    assert "MFU off" not in out
    vocab = json.loads((pretrain_work / "data/seq128/manifest.json").read_text())["vocab"]["size"]
    # bert-tiny by hand: 2 layers of 198,272; head 16,512 + 256 + 128·V + V; pooler + NSP 16,770
    per_token, per_pair = 6 * 2 * 198_272, 12 * 2 * 128
    per_masked, per_sample = 6 * (16_512 + 256 + 129 * vocab), 6 * 16_770
    records = [r for r in map(json.loads, (pretrain_work / "flops_run/metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        w, peak = r["work"], 0.05e12
        assert w["samples"] == 8 and w["positions"] == 8 * 128 and w["pairs_executed"] == 8 * 128 * 128
        assert w["masked_slots"] == 8 * 20 and 8 <= w["masked"] <= 8 * 20
        assert 8 < w["tokens"] <= 8 * 128 and w["pairs"] == w["tokens"] * 128
        assert r["tokens_per_s"] == pytest.approx(w["tokens"] / r["interval_s"])
        model = w["tokens"] * (per_token + 128 * per_pair) + w["masked"] * per_masked + 8 * per_sample
        executed = 8 * 128 * (per_token + 128 * per_pair) + 8 * 20 * per_masked + 8 * per_sample
        assert r["mfu"] == pytest.approx(model / r["interval_s"] / peak, rel=1e-12)
        assert r["hfu"] == pytest.approx(executed / r["interval_s"] / peak, rel=1e-12)
        assert r["mfu"] <= r["hfu"]
    assert f"MFU {100 * records[-1]['mfu']:.1f}% (HFU {100 * records[-1]['hfu']:.1f}%)" in out
