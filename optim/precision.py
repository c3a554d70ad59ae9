"""``"auto"`` precision in a DeepSpeed config, resolved before DeepSpeed reads it.

``"bf16": {"enabled": "auto"}`` and/or ``"fp16": {"enabled": "auto", ...}`` become bf16 where
the accelerator computes in bf16 (A100, H100 and later GPUs; CPUs with AVX512-BF16 or AMX),
fp16 with the config's loss-scaling settings on other GPUs (V100, T4), and fp32 on a CPU
without bf16 instructions (bf16 would be emulated there, several times slower than fp32).
"""
from __future__ import annotations

from pathlib import Path

FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}


def _cpu_has_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


def auto_choice(accelerator=None) -> str:
    """"bf16", "fp16" or "fp32": what ``"auto"`` means on this machine."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return "bf16" if _cpu_has_bf16() else "fp32"
    if accelerator.is_bf16_supported():
        return "bf16"
    return "fp16" if accelerator.is_fp16_supported() else "fp32"


def resolve_precision(config: dict, accelerator=None, source: str = "config") -> str:
    """Replace ``"auto"`` in ``config``'s bf16/fp16 blocks (in place); return the precision the
    config now asks for ("bf16", "fp16" or "fp32")."""
    blocks = {k: config.get(k) for k in ("bf16", "fp16")}
    for key, block in blocks.items():
        if block is not None and not isinstance(block, dict):
            raise ValueError(f"{source}: '{key}' must be an object such as {{\"enabled\": true}}")
        value = (block or {}).get("enabled", False)
        if value not in (True, False, "auto"):
            raise ValueError(f"{source}: {key}.enabled must be true, false or \"auto\", got {value!r}")
    if any((b or {}).get("enabled") == "auto" for b in blocks.values()):
        choice = auto_choice(accelerator)
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
