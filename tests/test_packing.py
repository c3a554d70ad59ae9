"""Packed sequences (pretrain/packing.py): the first-fit-decreasing packer over one micro-batch,
the packed batch it builds, and that a packed batch trains as the same samples padded."""
from __future__ import annotations

import pytest
import torch

from pretrain.packing import Packer, bucket_rows, fill_rate, first_fit_decreasing, max_rows

VOCAB, CLS, SEP, PAD = 1000, 2, 3, 0


def samples(lengths: list[int], seq_len: int, predictions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded micro-batch as data_prep's dataset stacks it: [CLS] A [SEP] B [SEP], the given
    lengths, token types 0/1, up to ``predictions`` masked positions (fewer in some samples)."""
    g = torch.Generator().manual_seed(seed)
    m = len(lengths)
    batch = {"input_ids": torch.full((m, seq_len), PAD), "token_type_ids": torch.zeros(m, seq_len, dtype=torch.long),
             "attention_mask": torch.zeros(m, seq_len, dtype=torch.long),
             "masked_lm_positions": torch.zeros(m, predictions, dtype=torch.long),
             "masked_lm_labels": torch.full((m, predictions), -1),
             "next_sentence_label": torch.randint(0, 2, (m,), generator=g)}
    for i, n in enumerate(lengths):
        a = max(2, n // 2)
        batch["input_ids"][i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        batch["input_ids"][i, [0, a - 1, n - 1]] = torch.tensor([CLS, SEP, SEP])
        batch["token_type_ids"][i, a:n] = 1
        batch["attention_mask"][i, :n] = 1
        k = min(predictions, max(1, n * 15 // 100 - i % 2))  # some samples leave slots empty
        pos = torch.randperm(n - 2, generator=g)[:k] + 1
        batch["masked_lm_positions"][i, :k] = pos
        batch["masked_lm_labels"][i, :k] = torch.randint(5, VOCAB, (k,), generator=g)
    return batch


def test_ffd_places_every_sample_once_longest_first():
    # by hand: 8 -> row 0; 7 -> row 1; 5 -> row 2; 3 -> row 1 (row 0 has 2 left); 2 -> row 0; 1 -> row 2
    assert first_fit_decreasing([3, 7, 5, 2, 8, 1], 10) == [[4, 3], [1, 0], [2, 5]]
    # ties keep the micro-batch's order
    assert first_fit_decreasing([4, 4, 4], 8) == [[0, 1], [2]]
    g = torch.Generator().manual_seed(0)
    for capacity in (128, 512):
        lengths = torch.randint(10, 129, (64,), generator=g).tolist()
        rows = first_fit_decreasing(lengths, capacity)
        assert rows == first_fit_decreasing(list(lengths), capacity)  # deterministic
        assert sorted(i for row in rows for i in row) == list(range(64))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        assert all(lengths[row[j]] >= lengths[row[j + 1]] for row in rows for j in range(len(row) - 1))
        # first fit: every row but the last is too full for the shortest sample of the rows after it
        for r in range(len(rows) - 1):
            assert capacity - sum(lengths[i] for i in rows[r]) < min(lengths[i] for row in rows[r + 1:] for i in row)
        assert len(rows) <= max_rows(64, 128, capacity)
    with pytest.raises(ValueError, match="sample 1 has 129 tokens; rows hold 1..128"):
        first_fit_decreasing([5, 129], 128)


def test_row_counts_come_in_few_buckets():
    # 16 samples of <= 128 tokens in rows of 128: up to 16 rows; 8 buckets count them in steps of 2
    assert max_rows(16, 128, 128) == 16
    assert [bucket_rows(r, 16, 128, 128, buckets=8) for r in (1, 2, 3, 15, 16)] == [2, 2, 4, 16, 16]
    # rows of 512 take at least 4 such samples each: up to 4 rows, every count its own shape
    assert max_rows(16, 128, 512) == 4 and [bucket_rows(r, 16, 128, 512, buckets=8) for r in (1, 3, 4)] == [2, 3, 4]
    assert bucket_rows(1, 1, 128, 128) == 1  # one row is the only shape there: nothing to recompile
    assert len({bucket_rows(r, 256, 128, 128, buckets=8) for r in range(1, 257)}) == 8
    assert len({bucket_rows(r, 256, 128, 128) for r in range(1, 257)}) == 32  # the default
    # rows of 200 hold one sample of <= 128 each: a pack_len not a multiple of seq_len
    assert max_rows(16, 128, 200) == 16 and max_rows(16, 128, 256) == 8


def test_packed_batch_holds_every_sample_as_it_was():
    lengths = [128, 40, 30, 50, 100, 7, 20, 64]  # rows: [128], [100, 20, 7], [64, 50], [40, 30]
    batch = samples(lengths, 128, 20)
    packed = Packer(seq_len=128, pack_len=128, micro_batch=8, pad_id=PAD).pack(batch)
    assert packed["input_ids"].shape == (4, 128)
    flat = {k: packed[k].reshape(-1) for k in ("input_ids", "token_type_ids", "position_ids", "sample_ids")}
    assert (flat["sample_ids"] >= 0).sum() == sum(lengths)
    for i, n in enumerate(lengths):
        at = (flat["sample_ids"] == i).nonzero().squeeze(1)
        assert at.tolist() == list(range(int(packed["cls_positions"][i]), int(packed["cls_positions"][i]) + n))
        assert torch.equal(flat["input_ids"][at], batch["input_ids"][i, :n])
        assert torch.equal(flat["token_type_ids"][at], batch["token_type_ids"][i, :n])
        assert flat["position_ids"][at].tolist() == list(range(n))
        assert flat["input_ids"][packed["cls_positions"][i]] == CLS
        # the masked positions point at the same tokens
        assert torch.equal(flat["input_ids"][packed["masked_lm_positions"][i]],
                           batch["input_ids"][i][batch["masked_lm_positions"][i]])
    assert [(flat["sample_ids"].view(4, 128)[r] >= 0).sum().item() for r in range(4)] == [128, 127, 114, 70]
    for key in ("masked_lm_labels", "next_sentence_label"):
        assert torch.equal(packed[key], batch[key])
    assert packed["sample_lengths"].tolist() == lengths
    padding = flat["sample_ids"] < 0
    assert (flat["input_ids"][padding] == PAD).all() and (flat["position_ids"][padding] == 0).all()
    # the same micro-batch packs the same way: a resumed run repeats its batches
    again = Packer(seq_len=128, pack_len=128, micro_batch=8, pad_id=PAD).pack(samples(lengths, 128, 20))
    assert all(torch.equal(packed[k], again[k]) for k in packed)


def test_bucket_padding_rows_hold_nothing():
    lengths = [100] * 5 + [20] * 5  # 5 rows of 120, rounded up to 6 (steps of 2 for 10 samples)
    packed = Packer(seq_len=128, pack_len=128, micro_batch=10, buckets=5).pack(samples(lengths, 128, 20))
    assert packed["input_ids"].shape == (6, 128)
    assert (packed["sample_ids"][5] == -1).all()
    assert fill_rate(lengths, 10, 128, 128, buckets=5) == pytest.approx(sum(lengths) / (6 * 128))
    assert fill_rate(lengths, 10, 128, 128) == pytest.approx(sum(lengths) / (5 * 128))
    assert fill_rate(lengths, 10, 128, None) == pytest.approx(sum(lengths) / (10 * 128))



LAMB = {"type": "Lamb", "params": {"lr": 1e-3}}  # a config trains with an optimizer (checked first)


@pytest.mark.parametrize("block,message", [
    ({"packing": "histogram"}, "pretrain.packing must be one of ('off', 'ffd'), got 'histogram'"),
    ({"packing": "ffd", "pack_len": 64}, "pretrain.pack_len must be an integer >= seq_len (128), got 64"),
    ({"packing": "ffd", "pack_buckets": 0}, "pretrain.pack_buckets must be a positive integer, got 0"),
])
def test_packing_settings_are_checked(tmp_path, block, message):
    import json
    import re

    from pretrain import config as config_mod

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"train_batch_size": 8, "optimizer": LAMB, "pretrain": {"data": "d/seq128", **block}}))
    with pytest.raises(config_mod.ConfigError, match=re.escape(f"cfg.json: {message}") + "$"):
        config_mod.load(path)
    path.write_text(json.dumps({"train_batch_size": 8, "optimizer": LAMB, "pretrain": {"data": "d/seq128", "packing": "ffd",
                                                                    "pack_len": 512}}))
    _, cfg = config_mod.load(path)
    assert (cfg.packing, cfg.pack_len, cfg.pack_buckets) == ("ffd", 512, 32)


def test_the_stream_packs_in_its_workers_and_resumes_where_it_stopped(pretrain_work):
    """Packed micro-batches (built in a DataLoader worker) hold the samples of the padded stream
    in the same order; a stream restored from a state taken after two batches gives the third."""
    from data_prep import PretrainingDataset
    from pretrain.data import TrainStream

    data = PretrainingDataset(pretrain_work / "data" / "seq128", seed=3)
    packer = Packer(seq_len=128, pack_len=256, micro_batch=8, pad_id=data.pad_id)
    padded = TrainStream(data, 8, world=1, rank=0, seed=3, num_workers=0)
    packed = TrainStream(data, 8, world=1, rank=0, seed=3, num_workers=1, collate_fn=packer)
    lengths = padded.upcoming_lengths(24)
    batches = [(padded.next(), packed.next()) for _ in range(3)]
    for k, (a, b) in enumerate(batches):
        assert torch.equal(b["sample_ids"], packer.pack(a)["sample_ids"])
        assert b["sample_lengths"].tolist() == lengths[8 * k:8 * k + 8] == a["attention_mask"].sum(1).tolist()
        flat = b["input_ids"].reshape(-1)
        for i in range(8):
            n, start = int(b["sample_lengths"][i]), int(b["cls_positions"][i])
            assert torch.equal(flat[start:start + n], a["input_ids"][i, :n])
    state = packed.state_dict()
    assert state["start_index"] == 24
    resumed = TrainStream(data, 8, world=1, rank=0, seed=3, num_workers=1, collate_fn=packer)
    resumed.load_state_dict(dict(state, start_index=16))
    third = resumed.next()
    assert all(torch.equal(third[k], batches[2][1][k]) for k in third)


# -- the packed forward: the math of the padded batch ---------------------------------------------

def tiny_model(vocab: int = VOCAB) -> "BertPretrainingModel":
    """bert-tiny's shape (2 layers, hidden 128), random weights, fp32, dropout off."""
    from pretrain.model import BertPretrainingModel, bert_config

    cfg = bert_config("bert-tiny", vocab)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    return BertPretrainingModel(cfg)


def losses_and_grads(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], object]:
    """(per-sample MLM loss (M,), per-sample NSP loss (M,), parameter gradients of the training
    loss, the model's output)."""
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        mlm_logits, nsp_logits = model.logits(**batch)
    labels = batch["masked_lm_labels"]
    per_slot = torch.nn.functional.cross_entropy(mlm_logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    real = labels >= 0
    mlm = (per_slot * real).sum(1) / real.sum(1)
    nsp = torch.nn.functional.cross_entropy(nsp_logits, batch["next_sentence_label"], reduction="none")
    return mlm, nsp, grads, out


def max_relative_difference(packed: dict, padded: dict) -> float:
    """max over tensors of |packed - padded| / |padded| (2-norms of whole tensors)."""
    assert packed.keys() == padded.keys()
    return max(float((packed[k] - padded[k]).norm() / padded[k].norm()) for k in padded)


def without_key_bias(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention key biases' gradient is zero in exact arithmetic (a bias added to every key
    shifts all of a query's scores alike, and softmax ignores that): in both layouts it is
    rounding noise (~1e-11), whose relative difference says nothing. Checked apart: tiny."""
    largest = max(float(g.norm()) for g in grads.values())
    for name, g in grads.items():
        if name.endswith("attention.self.key.bias"):
            assert g.norm() < 1e-8 * largest, name
    return {n: g for n, g in grads.items() if not n.endswith("attention.self.key.bias")}


CASES = {  # name: (seq_len, pack_len, lengths, buckets)
    # rows [128], [100, 20, 7], [64, 50], [40, 30]
    "seq128": (128, 128, [128, 40, 30, 50, 100, 7, 20, 64], 32),
    # rows of 512: [128, 128, 100, 64, 50, 40], [30, 20, 7]; the last case one row of all ten
    "seq128 rows of 512": (128, 512, [128, 40, 30, 50, 100, 7, 20, 64, 128], 32),
    # rows [512], [400, 100, 12], [300, 200], [180, 90, 60, 25] and an empty padding row (5 by 5)
    "seq512": (512, 512, [512, 300, 200, 180, 100, 60, 25, 400, 12, 90], 2),
    "seq512 rows of 2048": (512, 2048, [512, 300, 200, 180, 100, 60, 25, 400, 12, 90], 32),
}


@pytest.mark.parametrize("case", CASES)
def test_a_packed_batch_trains_as_the_padded_one(case):
    """The test that matters: per-sample MLM and NSP losses and every parameter's gradient of
    the packed batch equal those of the same samples padded (fp32, dropout off), for rows
    holding one sample, rows holding several, and an empty padding row."""
    seq, pack_len, lengths, buckets = CASES[case]
    predictions = 20 if seq == 128 else 80
    padded = samples(lengths, seq, predictions, seed=seq)
    packed = Packer(seq_len=seq, pack_len=pack_len, micro_batch=len(lengths), buckets=buckets).pack(padded)
    per_row = [set(row.tolist()) - {-1} for row in packed["sample_ids"]]
    assert max(map(len, per_row)) >= 3, per_row  # several together
    assert pack_len > seq or min(map(len, per_row)) <= 1, per_row  # and one alone (or none)
    model = tiny_model()
    mlm_a, nsp_a, grads_a, out_a = losses_and_grads(model, padded)
    mlm_b, nsp_b, grads_b, out_b = losses_and_grads(model, packed)
    assert torch.isfinite(mlm_b).all() and torch.isfinite(out_b.loss)
    worst = {"mlm": max_relative_difference({"x": mlm_b}, {"x": mlm_a}),
             "nsp": max_relative_difference({"x": nsp_b}, {"x": nsp_a}),
             "grad": max_relative_difference(without_key_bias(grads_b), without_key_bias(grads_a))}
    print(f"{case}: max relative difference {worst}")
    assert max(worst.values()) <= 1e-5, worst
    assert ((mlm_b - mlm_a).abs() / mlm_a.abs()).max() <= 1e-5  # each sample, not only the whole
    assert ((nsp_b - nsp_a).abs() / nsp_a.abs()).max() <= 1e-5
    for key in ("mlm_count", "mlm_correct", "nsp_count", "nsp_correct"):
        assert int(getattr(out_a, key)) == int(getattr(out_b, key)), key
    assert len(grads_b) == len(dict(model.named_parameters()))  # every parameter got its gradient


@pytest.mark.parametrize("seq", [128, 512])
def test_real_samples_packed_train_as_padded(pretrain_work, seq):
    """The same on data_prep samples (the embedded corpus, dynamic masks), 12 to a micro-batch."""
    from data_prep import PretrainingDataset

    data = PretrainingDataset(pretrain_work / "data" / f"seq{seq}", seed=1)
    items = [data[i] for i in range(0, 48, 4)]
    padded = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    packed = Packer(seq_len=seq, pack_len=seq, micro_batch=12, pad_id=data.pad_id)(items)
    assert packed["input_ids"].shape[0] < 12  # some rows hold several samples
    model = tiny_model(data.vocab_size)
    mlm_a, nsp_a, grads_a, _ = losses_and_grads(model, padded)
    mlm_b, nsp_b, grads_b, _ = losses_and_grads(model, packed)
    worst = {"mlm": max_relative_difference({"x": mlm_b}, {"x": mlm_a}),
             "nsp": max_relative_difference({"x": nsp_b}, {"x": nsp_a}),
             "grad": max_relative_difference(without_key_bias(grads_b), without_key_bias(grads_a))}
    print(f"real seq {seq}: max relative difference {worst}")
    assert max(worst.values()) <= 1e-5, worst


# -- run.py with packing on -------------------------------------------------------------------------

def test_a_packed_run_trains_logs_its_fill_and_resumes_exactly(pretrain_work):
    """run.py with ``pretrain.packing=ffd``: its start line and every metrics record give a fill
    rate above the padded one of the same samples, the record's work counts are the packed rows',
    and a run stopped after step 2 then resumed repeats the straight run's losses and weights
    exactly (the packer is a function of the micro-batch; the sampler position is per sample)."""
    import json
    import sys

    from data_prep import DistributedPretrainingSampler, PretrainingDataset
    from pretrain.checkpoint import fp32_state_dict, tag_for
    from tests.pretrain_helpers import ROOT, RUN, losses, run

    common = [sys.executable, str(RUN), "--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128",
              "--max-steps", "4", "--train-batch-size", "16", "--micro-batch-size", "8",
              "--set", "pretrain.log_every=1", "--set", "pretrain.eval_samples=16", "--set", "bf16.enabled=false",
              "--set", "pretrain.packing=ffd", "--set", "pretrain.num_workers=1"]
    straight = run(common + ["--output", "packed"], pretrain_work)
    run(common + ["--output", "packed_resumed", "--stop-after", "2"], pretrain_work)
    resumed = run(common + ["--output", "packed_resumed", "--resume"], pretrain_work)
    assert "resumed from step0000002" in resumed

    data = PretrainingDataset(pretrain_work / "data" / "seq128", seed=42)
    train = [k for k in range(data.manifest["num_shards"]) if k not in data.manifest["split"]["heldout_shards"]]
    data = PretrainingDataset(pretrain_work / "data" / "seq128", seed=42, shards=train)
    order = DistributedPretrainingSampler(data, 1, 0, seed=42).indices()[:4096]  # run.FILL_SAMPLES
    every = [len(data.raw(int(i))["tokens"]) for i in order]
    padded_fill = fill_rate(every, 8, 128, None)
    assert f"packed (ffd) into rows of 128: fill {fill_rate(every, 8, 128, 128):.3f} (padded {padded_fill:.3f})" \
        in straight
    lengths = every[:4 * 16]  # the 4 steps'
    records = [json.loads(x) for x in (pretrain_work / "packed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r, k in zip(steps, range(4)):
        chunk = lengths[16 * k:16 * k + 16]
        assert r["work"]["tokens"] == sum(chunk) and r["work"]["samples"] == 16
        assert r["work"]["pairs"] == sum(n * n for n in chunk)  # a packed token attends over its own sample
        assert r["fill"] == pytest.approx(r["work"]["tokens"] / r["work"]["positions"])
        assert r["fill"] == pytest.approx(fill_rate(chunk, 8, 128, 128))
    assert sum(r["work"]["tokens"] for r in steps) / sum(r["work"]["positions"] for r in steps) > padded_fill

    a, b = losses(pretrain_work / "packed"), losses(pretrain_work / "packed_resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a == b  # exact floats
    wa = fp32_state_dict(pretrain_work / "packed" / "checkpoints", tag_for(4))
    wb = fp32_state_dict(pretrain_work / "packed_resumed" / "checkpoints", tag_for(4))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
