"""pretrain: config loading and its errors, batch arithmetic, the masked-position MLM head."""
from __future__ import annotations

import json

import pytest
import torch

from pretrain import config as config_mod
from pretrain.model import PRESETS, BertPretrainingModel, bert_config


def write(tmp_path, cfg: dict, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


BASE = {"train_batch_size": 64, "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_proportion": 0.1}},
        "pretrain": {"data": "somewhere/seq128", "max_steps": 77}}


def test_config_splits_blocks_and_fills_schedule(tmp_path):
    ds, cfg = config_mod.load(write(tmp_path, dict(BASE, _comment="why")), {"max_steps": 50, "micro_batch_size": 8})
    assert "pretrain" not in ds and "_comment" not in ds
    assert cfg.max_steps == 50 and ds["scheduler"]["params"]["total_num_steps"] == 50
    assert ds["train_micro_batch_size_per_gpu"] == 8
    eff = config_mod.effective(ds, cfg)
    assert eff["pretrain"]["max_steps"] == 50 and eff["train_batch_size"] == 64


def test_set_assignments(tmp_path):
    ds, cfg = config_mod.load(write(tmp_path, BASE), None, ["pretrain.log_every=1", "zero_optimization.stage=1",
                                                           "pretrain.model=mini"])
    assert cfg.log_every == 1 and cfg.model == "mini" and ds["zero_optimization"] == {"stage": 1}
    with pytest.raises(config_mod.ConfigError, match="expected KEY=VALUE"):
        config_mod.load(write(tmp_path, BASE), None, ["pretrain.log_every"])


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c["pretrain"].update(warmup=3), r"unknown pretrain key\(s\) \['warmup'\]"),
    (lambda c: c["pretrain"].update(max_steps=0), "pretrain.max_steps must be a positive integer"),
    (lambda c: c["pretrain"].pop("data"), "pretrain.data is not set"),
    (lambda c: c["pretrain"].update(init_optimizer_state="maybe"), "init_optimizer_state must be one of"),
    (lambda c: c["scheduler"]["params"].update(total_num_steps=10), "total_num_steps \\(10\\) differs from pretrain.max_steps"),
    (lambda c: c.update(bf16={"enabled": "auto", "check_grad_overflow": False},
                        zero_optimization={"stage": 1, "compute_grad_norm": False}),
     "bf16.check_grad_overflow and zero_optimization.compute_grad_norm are both false"),
])
def test_config_errors_name_the_key(tmp_path, mutate, msg):
    cfg = json.loads(json.dumps(BASE))
    mutate(cfg)
    with pytest.raises(config_mod.ConfigError, match=msg):
        config_mod.load(write(tmp_path, cfg))


def test_resume_fingerprint_ignores_how_bad_steps_are_caught(tmp_path):
    # A run saved before the configs set bf16.check_grad_overflow resumes with them; a change of
    # precision is still a different run.
    from pretrain.run import fingerprint

    ds, cfg = config_mod.load(write(tmp_path, dict(BASE, bf16={"enabled": True})))
    before = fingerprint(ds, cfg, {"build_id": "b"})["hash"]
    assert fingerprint(dict(ds, bf16={"enabled": True, "check_grad_overflow": False}), cfg, {"build_id": "b"})["hash"] == before
    assert fingerprint(dict(ds, bf16={"enabled": False}), cfg, {"build_id": "b"})["hash"] != before


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n "train_batch_size": 8,\n}')
    with pytest.raises(config_mod.ConfigError, match=r"broken.json: invalid JSON at line 3"):
        config_mod.load(path)


@pytest.mark.parametrize("ds,world,want", [
    ({"train_batch_size": 64}, 2, (64, 32, 1)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2, (64, 8, 4)),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3}, 2, (48, 8, 3)),
])
def test_batch_arithmetic(ds, world, want):
    assert config_mod.resolve_batch(dict(ds), world, "cfg.json") == want


@pytest.mark.parametrize("ds,msg", [
    ({"train_batch_size": 65536, "train_micro_batch_size_per_gpu": 48}, "not a multiple of train_micro_batch_size_per_gpu 48 x world size 8"),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3},
     r"4 x gradient_accumulation_steps 3 x world size 8 = 96, not train_batch_size 64"),
    ({"train_micro_batch_size_per_gpu": 4}, "set train_batch_size, or both"),
])
def test_batch_arithmetic_errors(ds, msg):
    with pytest.raises(config_mod.ConfigError, match=msg):
        config_mod.resolve_batch(dict(ds), 8, "cfg.json")


def test_presets_and_config_json(tmp_path):
    for name, (layers, hidden, heads) in PRESETS.items():
        c = bert_config(name, 1000)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (layers, hidden, heads)
        assert c.max_position_embeddings == 512 and c._attn_implementation == "sdpa"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(bert_config("bert-tiny", 1000).to_dict()))
    assert bert_config(str(path), 1000).hidden_size == 128
    with pytest.raises(ValueError, match="vocab_size 1000 but the data's vocab has 999"):
        bert_config(str(path), 999)
    with pytest.raises(ValueError, match="neither a preset"):
        bert_config("huge", 1000)


def test_masked_position_head_equals_full_projection():
    torch.manual_seed(0)
    model = BertPretrainingModel(bert_config("bert-tiny", 500)).eval()
    g = torch.Generator().manual_seed(1)
    B, L, P = 3, 32, 5
    batch = dict(input_ids=torch.randint(5, 500, (B, L), generator=g),
                 token_type_ids=torch.zeros(B, L, dtype=torch.long), attention_mask=torch.ones(B, L, dtype=torch.long),
                 masked_lm_positions=torch.stack([torch.randperm(L - 1, generator=g)[:P] + 1 for _ in range(B)]),
                 masked_lm_labels=torch.randint(5, 500, (B, P), generator=g),
                 next_sentence_label=torch.randint(0, 2, (B,), generator=g))
    batch["masked_lm_labels"][0, 3:] = -1  # padding slots do not count
    fast, full = model(**batch), model(**batch, full_vocab_projection=True)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert int(fast.mlm_count) == B * P - 2
    # and the same numbers as transformers' BertForPreTraining on the full sequence
    from transformers import BertForPreTraining

    hf = BertForPreTraining(model.config).eval()
    hf.load_state_dict(model.state_dict())
    labels = torch.full((B, L), -100)
    for b in range(B):
        for p in range(P):
            if batch["masked_lm_labels"][b, p] >= 0:
                labels[b, batch["masked_lm_positions"][b, p]] = batch["masked_lm_labels"][b, p]
    ref = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
             attention_mask=batch["attention_mask"], labels=labels, next_sentence_label=batch["next_sentence_label"])
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in hf.named_parameters()]


def test_phase2_from_an_hf_export_loads_its_weights_and_says_the_optimizer_starts_fresh(tmp_path):
    """An HF export as ``--init-checkpoint``: every weight loaded (the tied decoder too), and the
    start line says there were no moments to keep; a DeepSpeed checkpoint's line is unchanged."""
    from pretrain.model import build_model
    from pretrain.run import init_note, init_weights

    source = build_model("bert-tiny", 500, seed=1)
    source.save_pretrained(tmp_path / "hf")
    model = build_model("bert-tiny", 500, seed=2)
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, source.bert.embeddings.word_embeddings.weight)
    assert init_weights(model, str(tmp_path / "hf"), True) == ("hf", None, None)
    want = source.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert init_note("p1/hf", "hf", True) == ", initialised from p1/hf (hf: weights only, the optimizer starts fresh)"
    assert init_note("p1/hf", "hf", False) == ", initialised from p1/hf (hf)"  # "reset" asked for nothing more
    assert init_note("p1", "deepspeed", True) == ", initialised from p1 (deepspeed)"
    assert init_note(None, None, True) == ""


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (1, 3), (3, 2), (2, 5)])
def test_zero_state_is_cut_into_the_partitions_of_another_world_size(old, new):
    """ZeRO-1/2 partitions of a group are slices of one flat vector padded to a multiple of twice
    the world size. DeepSpeed saves each rank's fp32 slice without its padding and the moments
    with it (NaN here: it must not be copied). The new world's slices, end to end, are the same
    vector, padded with zeros; the step count is copied; the other entries come from old rank 0."""
    from pretrain.zero_reshard import reshard_zero_state

    lengths = [1001, 7, 1]  # odd lengths: rank 0 of a 1-rank save holds padding too
    full = {k: [torch.randn(n, dtype=torch.float64) for n in lengths] for k in ("fp32", "exp_avg", "exp_avg_sq")}

    def layout(world: int, n: int) -> tuple[int, list[int]]:
        """(partition size, padding in each rank's partition), DeepSpeed's rule"""
        size = -(-n // (2 * world)) * 2
        return size, [min(size, max(0, (r + 1) * size - n)) for r in range(world)]

    def partitions(vector: torch.Tensor, world: int, unpadded: bool) -> list[torch.Tensor]:
        size, pads = layout(world, vector.numel())
        padded = torch.cat([vector, torch.full((size * world - vector.numel(),), float("nan"), dtype=vector.dtype)])
        return [piece[:size - pad] if unpadded else piece for piece, pad in zip(padded.split(size), pads)]

    fp32 = [partitions(v, old, unpadded=True) for v in full["fp32"]]  # [group][rank]
    moments = {k: [partitions(v, old, unpadded=False) for v in full[k]] for k in ("exp_avg", "exp_avg_sq")}
    parts = [{"loss_scaler": "scaler", "ds_version": "0.19.8", "partition_count": [old] * 3,
              "group_paddings": [layout(old, n)[1][r] for n in lengths],
              "single_partition_of_fp32_groups": [fp32[g][r] for g in range(3)],
              "base_optimizer_state": {
                  "state": {g: {"step": 9, **{k: moments[k][g][r] for k in moments}} for g in range(3)},
                  "param_groups": [{"params": [g], "lr": 1e-3} for g in range(3)]}}
             for r in range(old)]
    sizes = [layout(new, n)[0] for n in lengths]
    mine = [reshard_zero_state(parts, sizes, r, new) for r in range(new)]
    for g, n in enumerate(lengths):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            pieces = [x["single_partition_of_fp32_groups"][g] if key == "fp32" else
                      x["base_optimizer_state"]["state"][g][key] for x in mine]
            assert [p.numel() for p in pieces] == [sizes[g]] * new
            joined = torch.cat(pieces)
            assert torch.equal(joined[:n], full[key][g]), (key, g)
            assert not joined[n:].any(), (key, g)  # the new padding is zeros, never the old NaN
        assert [x["group_paddings"][g] for x in mine] == layout(new, n)[1]
    assert all(x["base_optimizer_state"]["state"][g]["step"] == 9 for x in mine for g in range(3))
    assert all(x["partition_count"] == [new] * 3 and x["loss_scaler"] == "scaler" for x in mine)
    assert mine[0]["base_optimizer_state"]["param_groups"] == parts[0]["base_optimizer_state"]["param_groups"]


def test_a_checkpoint_missing_a_partition_names_it(tmp_path):
    """The world size that wrote a checkpoint comes from its model file, not from counting the
    partition files: a lost one would otherwise pass for a smaller world (and a re-partitioned
    resume would fill its share with zeros)."""
    from pretrain.zero_reshard import saved_world

    tag = tmp_path / "step0000004"
    tag.mkdir()
    assert saved_world(tag) is None  # no partitions: nothing to re-partition
    torch.save({"dp_world_size": 3}, tag / "mp_rank_00_model_states.pt")
    for r in (0, 2):
        torch.save({}, tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    with pytest.raises(FileNotFoundError, match="written by 3 ranks, partition file.s. missing: "
                                                "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        saved_world(tag)
    torch.save({}, tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert saved_world(tag) == 3


def test_metrics_log_drops_records_a_resumed_run_repeats(tmp_path):
    from pretrain.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, start_step=0)
    for step in (1, 2, 3, 4):
        log.log({"step": step, "eval_mlm_loss": float(step)})
    MetricsLogger(tmp_path, enabled=True, tensorboard=False, start_step=2)  # resume from step 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_progress_line_shows_the_loss_and_its_parts(tmp_path, capsys):
    from pretrain.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, start_step=0)
    rec = {"step": 10, "loss": 7.25, "mlm_loss": 6.5, "nsp_loss": 0.75, "mlm_acc": 0.1, "nsp_acc": 0.6, "lr": 1e-3,
           "samples_per_s": 100.0, "tokens_per_s": 6400.0}
    log.log(rec)
    assert "step     10 | loss 7.2500 (mlm 6.5000 nsp 0.7500) | mlm_acc 0.100" in capsys.readouterr().out
    log.log({k: v for k, v in rec.items() if k not in ("mlm_loss", "nsp_loss")})  # an older record's keys
    assert "loss 7.2500 | mlm_acc" in capsys.readouterr().out


class _PhaseOneEngine:
    """Stands in for a DeepSpeed engine whose load_checkpoint restores phase 1's LAMB state (as
    ZeRO's load does) and phase 1's param-group settings (lr 0 at the end of its decay)."""

    def __init__(self):
        import optim

        self.w = torch.nn.Parameter(torch.ones(3))
        self.basic_optimizer = optim.Lamb([self.w], lr=4e-3)
        self.optimizer = self.basic_optimizer
        self.global_steps = self.global_samples = self.skipped_steps = 7

    def load_checkpoint(self, path, tag, load_optimizer_states, load_lr_scheduler_states):
        assert load_optimizer_states and not load_lr_scheduler_states
        self.optimizer.state[self.w] = {"step": 6, "exp_avg": torch.full((3,), 0.5), "exp_avg_sq": torch.full((3,), 0.25)}
        self.optimizer.param_groups[0]["lr"] = 0.0


@pytest.mark.parametrize("mode,step", [("keep", 0), ("keep_step", 6)])
def test_phase2_keeps_the_moments_and_restarts_or_keeps_the_step_count(tmp_path, mode, step):
    from pretrain.checkpoint import restore_phase1_optimizer

    engine = _PhaseOneEngine()
    restore_phase1_optimizer(engine, tmp_path, "step0000006", mode)
    state = engine.optimizer.state[engine.w]
    assert state["step"] == step  # keep: bias correction from t = 1 again, as NVIDIA's phase 2
    assert torch.equal(state["exp_avg"], torch.full((3,), 0.5))  # the moments are phase 1's either way
    assert engine.optimizer.param_groups[0]["lr"] == 4e-3  # phase 2's own lr, not phase 1's last
    assert engine.global_steps == engine.global_samples == engine.skipped_steps == 0


class SlowDataset(torch.utils.data.Dataset):
    """Each sample takes ``delay`` seconds to produce: a loader that cannot keep up."""

    path = "slow"

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import time

        time.sleep(self.delay)
        return {"input_ids": torch.full((4,), i)}

    def set_epoch(self, epoch: int) -> None:
        pass


def test_train_stream_counts_the_time_it_waits_for_batches():
    import time

    from pretrain.data import TrainStream

    stream = TrainStream(SlowDataset(64, delay=0.02), micro_batch=4, world=1, rank=0, seed=0, num_workers=0)
    for _ in range(3):
        stream.next()
    waited = stream.take_wait()
    assert waited >= 3 * 4 * 0.02  # every sample's delay was waited for in this process
    assert stream.take_wait() == 0.0  # reset by the call
    time.sleep(0.5)  # time spent elsewhere (the step) is not data wait
    stream.next()
    assert 4 * 0.02 <= stream.take_wait() < 0.5


def test_time_in_evaluations_and_checkpoints_is_not_training_time(tmp_path):
    import time

    from pretrain.metrics import MetricsLogger

    m = MetricsLogger(tmp_path, enabled=False, tensorboard=False, start_step=0)
    time.sleep(0.1)  # training
    with m.paused():
        time.sleep(0.4)  # an evaluation between two records
    time.sleep(0.1)
    assert 0.2 <= m.elapsed() < 0.4  # samples/s of the record divide by training time alone
