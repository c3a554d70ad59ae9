"""``"auto"`` precision in a DeepSpeed config, resolved before DeepSpeed reads it.

``"bf16": {"enabled": "auto"}`` and/or ``"fp16": {"enabled": "auto", ...}`` become bf16 where
the accelerator computes in bf16 (A100, H100 and later GPUs; CPUs with AVX512-BF16 or AMX),
fp16 with the config's loss-scaling settings on other GPUs (V100, T4), and fp32 on a CPU
without bf16 instructions (bf16 would be emulated there, several times slower than fp32).

On CUDA GPUs the answer comes from the compute capability (8.0, Ampere, and later have bf16
tensor cores), not from ``torch.cuda.is_bf16_supported()``: that counts emulation and says True
on a V100 (7.0) or T4 (7.5), where bf16 runs without tensor cores at a fraction of fp16's speed.
Other accelerators (ROCm, XPU, HPU, ...) keep their own answer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}


def _cpu_has_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


BF16_CAPABILITY = (8, 0)  # NVIDIA Ampere: the first GPUs whose tensor cores compute in bf16


def _cuda_capability() -> Optional[tuple[int, int]]:
    """This process's CUDA device's compute capability; None on ROCm (HIP reports a gfx number
    in its place, which says nothing about bf16) or without a device."""
    import torch

    if torch.version.hip is not None or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def auto_choice(accelerator=None, capability: Optional[tuple[int, int]] = None) -> str:
    """"bf16", "fp16" or "fp32": what ``"auto"`` means on this machine. ``capability``: the CUDA
    device's compute capability (default: asked of torch when the accelerator is CUDA)."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    name = accelerator.device_name()
    if name == "cpu":
        return "bf16" if _cpu_has_bf16() else "fp32"
    if name == "cuda" and capability is None:
        capability = _cuda_capability()
    if name == "cuda" and capability is not None:
        bf16 = tuple(capability) >= BF16_CAPABILITY
    else:
        bf16 = accelerator.is_bf16_supported()
    if bf16:
        return "bf16"
    return "fp16" if accelerator.is_fp16_supported() else "fp32"


def resolve_precision(config: dict, accelerator=None, source: str = "config",
                      capability: Optional[tuple[int, int]] = None) -> str:
    """Replace ``"auto"`` in ``config``'s bf16/fp16 blocks (in place); return the precision the
    config now asks for ("bf16", "fp16" or "fp32"). ``accelerator`` and ``capability``: see
    :func:`auto_choice`."""
    blocks = {k: config.get(k) for k in ("bf16", "fp16")}
    for key, block in blocks.items():
        if block is not None and not isinstance(block, dict):
            raise ValueError(f"{source}: '{key}' must be an object such as {{\"enabled\": true}}")
        value = (block or {}).get("enabled", False)
        if value not in (True, False, "auto"):
            raise ValueError(f"{source}: {key}.enabled must be true, false or \"auto\", got {value!r}")
    if any((b or {}).get("enabled") == "auto" for b in blocks.values()):
        choice = auto_choice(accelerator, capability)
        for key in ("bf16", "fp16"):
            if choice == key:
                block = config.setdefault(key, {})
                block["enabled"] = True
                if key == "fp16":
                    for k, v in FP16_DEFAULTS.items():
                        block.setdefault(k, v)
            elif key in config:
                config[key]["enabled"] = False
    if all((config.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16")):
        raise ValueError(f"{source}: bf16 and fp16 are both enabled; enable one (or set both to \"auto\")")
    return precision_of(config)


def precision_of(config: dict) -> str:
    """"bf16", "fp16" or "fp32": what a resolved config (no ``"auto"`` left) trains in."""
    on = [k for k in ("bf16", "fp16") if (config.get(k) or {}).get("enabled") is True]
    return on[0] if on else "fp32"
