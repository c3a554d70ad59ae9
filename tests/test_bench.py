"""The benchmarks' own logic that needs no accelerator: bench/engine_step.py's modes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import engine_step

SHIPPED = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "lamb_64k.json").read_text())


def test_an_engine_mode_carries_config_overrides_as_json_values():
    base, sets = engine_step.parse_mode("zero1+bf16.check_grad_overflow=true+zero_optimization.reduce_bucket_size=1000")
    assert base == "zero1" and sets == {"bf16.check_grad_overflow": True, "zero_optimization.reduce_bucket_size": 1000}
    cfg = engine_step.engine_config("zero1+bf16.check_grad_overflow=true+zero_optimization.reduce_bucket_size=1000",
                                    micro=8, accum=2, bf16=True)
    assert cfg["bf16"] == {**SHIPPED["bf16"], "enabled": True, "check_grad_overflow": True}
    assert cfg["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 2


def test_a_plain_mode_is_the_shipped_config_at_its_stage():
    cfg = engine_step.engine_config("zero2", micro=8, accum=2, bf16=True)
    assert cfg["bf16"] == {**SHIPPED["bf16"], "enabled": True}  # the shipped check_grad_overflow kept
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["optimizer"]["type"] == SHIPPED["optimizer"]["type"] and "pretrain" not in cfg


@pytest.mark.parametrize("mode, message", [
    ("zero4", "a mode is one of bare, zero0, zero1, zero2"),
    ("bare+bf16.enabled=true", "a mode is one of"),
    ("zero2+bf16.check_grad_overflow", "is not key=value"),
    ("zero2+bf16.check_grad_overflow=nope", "'nope' is not a JSON value"),
])
def test_a_bad_mode_is_named(mode, message):
    with pytest.raises(ValueError, match=message):
        engine_step.parse_mode(mode)


def test_a_plus_inside_a_value_is_part_of_it():
    assert engine_step.parse_mode("zero2+zero_optimization.reduce_bucket_size=5e+8+bf16.enabled=true") == \
        ("zero2", {"zero_optimization.reduce_bucket_size": 5e8, "bf16.enabled": True})
    with pytest.raises(ValueError, match="train_batch_size in train_batch_size.x is not an object"):
        engine_step.engine_config("zero2+train_batch_size.x=1", micro=8, accum=2, bf16=True)


def test_profiles_follow_the_modes_and_can_be_left_out():
    assert engine_step.parse_args(["--modes", "bare,zero1,zero2"]).profiled == ["bare", "zero2"]
    # gpu_check's stage f: one mode, no profile (the default profile names a mode not run)
    assert engine_step.parse_args(["--modes", "zero2", "--no-profile", "--compile", "aot_eager"]).profiled == []
    with pytest.raises(SystemExit):
        engine_step.parse_args(["--modes", "zero2"])  # profiling "bare", which is not run
