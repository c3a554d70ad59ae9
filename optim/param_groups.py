"""Split a model's parameters into weight-decay and no-decay groups.

Biases and normalisation weights get no weight decay (the BERT recipes exclude ``bias``,
``LayerNorm.weight`` and ``LayerNorm.bias``). Detection is by module type (any ``*Norm`` layer,
including LayerNorm, RMSNorm, BatchNorm, GroupNorm) and by 1-D shape, so it works for any
``nn.Module``, not only for parameters spelled like BERT's.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.normalization.LayerNorm, nn.modules.batchnorm._NormBase,
                               nn.GroupNorm, nn.LocalResponseNorm)) or "norm" in type(module).__name__.lower()


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that should not be decayed: biases, norm weights, other 1-D tensors."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name.endswith("bias") or _is_norm(module) or p.ndim <= 1:
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float,
                 extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Two param groups (``decay``, ``no_decay``) with ``param_names`` for telemetry.

    The no-decay group (biases, norm weights) is also excluded from LARS's layer-wise adaptation
    (``"adapt": False``; see ``optim.Lars``); LAMB follows its variant's ``adapt_no_decay`` knob.

    ``extra_no_decay``: substrings of parameter names to exclude from decay as well.
    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    """
    skip = no_decay_names(model)
    extra = tuple(extra_no_decay)
    decay: dict[str, list] = {"params": [], "param_names": []}
    no_decay: dict[str, list] = {"params": [], "param_names": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if name in skip or any(s in name for s in extra) else decay
        target["params"].append(p)
        target["param_names"].append(name)
    groups = []
    if decay["params"]:
        groups.append({**decay, "weight_decay": weight_decay, "adapt": True})
    if no_decay["params"]:
        groups.append({**no_decay, "weight_decay": 0.0, "adapt": False})
    return groups


def count(groups: list[dict]) -> dict[str, int]:
    return {("decay" if g["weight_decay"] else "no_decay"): sum(p.numel() for p in g["params"]) for g in groups}


__all__ = ["param_groups", "no_decay_names", "count"]
