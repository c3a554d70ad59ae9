"""Precision "auto" resolved before DeepSpeed reads the config, and the peak table behind MFU."""
from __future__ import annotations

import pytest

from optim.precision import precision_of, resolve_precision
from pretrain.metrics import peak_tflops


class FakeAccelerator:
    def __init__(self, name: str, bf16: bool, fp16: bool = True):
        self.name, self.bf16, self.fp16 = name, bf16, fp16

    def device_name(self):
        return self.name

    def is_bf16_supported(self):
        return self.bf16

    def is_fp16_supported(self):
        return self.fp16


SHIPPED = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}}


# A FakeAccelerator says what torch.cuda.is_bf16_supported() says: True on every GPU since torch
# counts emulation. The compute capability decides for CUDA devices.
@pytest.mark.parametrize("acc,capability,want", [
    (FakeAccelerator("cuda", bf16=True), (8, 0), "bf16"),   # A100
    (FakeAccelerator("cuda", bf16=True), (9, 0), "bf16"),   # H100, H200
    (FakeAccelerator("cuda", bf16=True), (7, 0), "fp16"),   # V100: bf16 only emulated
    (FakeAccelerator("cuda", bf16=True), (7, 5), "fp16"),   # T4
    (FakeAccelerator("cuda", bf16=False, fp16=False), (6, 0), "fp32"),
])
def test_auto_on_gpus(acc, capability, want):
    cfg = {k: dict(v) for k, v in SHIPPED.items()}
    assert resolve_precision(cfg, acc, capability=capability) == want
    assert cfg["bf16"]["enabled"] is (want == "bf16") and cfg["fp16"]["enabled"] is (want == "fp16")
    assert precision_of(cfg) == want  # what fine-tuning's results and bench/ report for the resolved config
    assert cfg["fp16"]["initial_scale_power"] == 16  # the block's own loss-scaling settings stay


@pytest.mark.parametrize("bf16,want", [(True, "bf16"), (False, "fp16")])
def test_auto_on_other_accelerators_keeps_their_answer(bf16, want):
    # no compute capability (ROCm reports none that means bf16; XPU, HPU, ...): the accelerator's word
    cfg = {k: dict(v) for k, v in SHIPPED.items()}
    assert resolve_precision(cfg, FakeAccelerator("xpu", bf16=bf16)) == want


def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch):
    import optim.precision as precision

    for has, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "_cpu_has_bf16", lambda has=has: has)
        cfg = {k: dict(v) for k, v in SHIPPED.items()}
        assert resolve_precision(cfg, FakeAccelerator("cpu", bf16=True)) == want


def test_auto_in_one_block_alone_adds_fp16_defaults():
    cfg = {"bf16": {"enabled": "auto"}}
    assert resolve_precision(cfg, FakeAccelerator("cuda", bf16=True), capability=(7, 0)) == "fp16"
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                           "hysteresis": 2, "min_loss_scale": 1}
    assert cfg["bf16"]["enabled"] is False


def test_explicit_settings_are_kept_and_checked():
    cfg = {"bf16": {"enabled": True}}
    assert resolve_precision(cfg, FakeAccelerator("cuda", bf16=False)) == "bf16"  # the user's choice stands
    with pytest.raises(ValueError, match="bf16 and fp16 are both enabled"):
        resolve_precision({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, FakeAccelerator("cuda", True))
    with pytest.raises(ValueError, match=r"fp16.enabled must be true, false or \"auto\", got 'yes'"):
        resolve_precision({"fp16": {"enabled": "yes"}}, FakeAccelerator("cuda", True))


def test_shipped_gpu_configs_say_auto():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ds_configs"
    for name in ("lamb_64k.json", "lamb_32k.json", "ds_lamb_64k.json", "ds_lamb_32k.json", "adamw_baseline.json"):
        cfg = json.loads((root / name).read_text())
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto", name


@pytest.mark.parametrize("name,precision,want", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA A100-SXM4-80GB", "fp16", 312.0), ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA H200", "bf16", 989.0), ("cpu", "bf16", None),
])
def test_peak_table(name, precision, want):
    assert peak_tflops(name, precision) == want
