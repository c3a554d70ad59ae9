"""Fine-tuning reads its DeepSpeed JSON as pretraining does: one no-decay rule, precision "auto"
resolved (fp16 honoured where it can run), the effective config recorded."""
from __future__ import annotations

import json

import pytest
from torch import nn

import optim
from finetune.squad import ds_config, parse_args


def args_for(tmp_path, config: dict, *extra: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return parse_args(["--checkpoint", "x", "--train-file", "t.json", "--output", str(tmp_path / "o"),
                       "--config", str(path), "--batch-size", "8", *extra])


def test_auto_precision_is_resolved_before_deepspeed(tmp_path, monkeypatch):
    import optim.precision as precision

    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: False)  # this project's own helper
    cfg = ds_config(args_for(tmp_path, {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}), world=1)
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # fp32 on this CPU
    assert cfg["train_micro_batch_size_per_gpu"] == 8


def test_bf16_flag_forces_bf16_and_an_fp16_block_is_not_dropped(tmp_path):
    cfg = ds_config(args_for(tmp_path, {"fp16": {"enabled": "auto", "loss_scale": 0}}, "--bf16"), world=1)
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"] == {"enabled": False, "loss_scale": 0}


def test_fp16_on_the_cpu_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        ds_config(args_for(tmp_path, {"fp16": {"enabled": True}}), world=1)


def test_the_shipped_config_says_auto():
    from finetune.squad import DEFAULT_CONFIG

    cfg = json.loads(DEFAULT_CONFIG.read_text())
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"


def test_one_no_decay_rule():
    """finetune builds its groups with optim.param_groups: no second rule to drift apart."""
    import inspect

    import finetune.squad as squad

    src = inspect.getsource(squad)
    assert "param_groups(model, args.weight_decay)" in src and "_no_decay" not in src
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    decay, no_decay = optim.param_groups(model, 0.01)
    assert decay["param_names"] == ["0.weight"] and sorted(no_decay["param_names"]) == ["0.bias", "1.bias", "1.weight"]


@pytest.mark.parametrize("saved", ["float16", "bfloat16"])
def test_a_half_precision_checkpoint_loads_as_fp32(tmp_path, saved):
    # transformers 5 keeps a checkpoint's stored dtype; fine-tuning in fp32 (or with fp32 masters)
    # needs fp32 weights, the same values as stored.
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizerFast

    from finetune.checkpoint import load_model

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    stored = BertForQuestionAnswering(cfg).to(getattr(torch, saved))
    out = tmp_path / "ckpt"
    stored.save_pretrained(out)
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(out)
    model, _ = load_model(out)
    want = dict(stored.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, want[name].float()), name
