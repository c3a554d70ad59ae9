"""Learning-rate schedules of the large-batch BERT recipes, and LR-scaling rules.

Each schedule is a pure function ``step -> multiplier of the peak lr`` (easy to test and plot)
wrapped by :func:`build_scheduler` into a ``torch.optim.lr_scheduler.LambdaLR``, which the
DeepSpeed engine steps once per optimizer step. ``step`` counts completed optimizer steps, so
the first update uses ``multiplier(0)``.

Warmup is given either as a fraction of the total steps (``warmup_proportion``, as in the
NVIDIA and bing_bert configs) or as a number of steps (``warmup_steps``).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch


def resolve_warmup(total_steps: int, warmup_proportion: Optional[float] = None,
                   warmup_steps: Optional[int] = None) -> int:
    """Warmup length in steps from exactly one of a proportion of ``total_steps`` or a count."""
    if (warmup_proportion is None) == (warmup_steps is None):
        raise ValueError("give exactly one of warmup_proportion and warmup_steps")
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return int(warmup_steps)
    if not 0.0 <= warmup_proportion <= 1.0:
        raise ValueError(f"warmup_proportion must be in [0, 1], got {warmup_proportion}")
    return int(round(warmup_proportion * total_steps))


def poly_decay(step: int, total_steps: int, warmup_steps: int, power: float = 0.5) -> float:
    """Linear warmup, then (1 − t/total)^power with t = step + 1, the update being taken.

    This is the shape of NVIDIA's ``PolyWarmUpScheduler`` (DeepLearningExamples BERT, power 0.5):
    the decay is measured from step 0, not from the end of warmup, so the multiplier drops from
    ~1 to (1 − warmup/total)^power when warmup ends. power 1.0 is the original BERT's linear decay.
    """
    t = step + 1
    if t < warmup_steps:
        return t / warmup_steps
    return max(0.0, 1.0 - t / total_steps) ** power


def constant_after_warmup(step: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def warmup_exp_decay_exp(step: int, total_steps: int, warmup_steps: int, decay_rate: float,
                         decay_steps: int, degree: float = 2.0) -> float:
    """bing_bert's ``warmup_exp_decay_exp`` (DeepSpeedExamples): polynomial warmup
    ((step/warmup)^degree) then exponential decay ``decay_rate^((step − warmup)/decay_steps)``."""
    del total_steps  # part of the recipe's signature; the shape depends on warmup only
    if warmup_steps == 0:
        return decay_rate ** (step / decay_steps)
    if step < warmup_steps:
        return (step / warmup_steps) ** degree
    return decay_rate ** ((step - warmup_steps) / decay_steps)


def scale_lr(base_lr: float, base_batch_size: int, batch_size: int, rule: str = "sqrt") -> float:
    """Learning rate for ``batch_size`` from one tuned at ``base_batch_size``.

    ``sqrt``: lr·√(B/B0), the rule the LAMB paper uses; ``linear``: lr·B/B0 (Goyal et al. 2017);
    ``none``: unchanged.
    """
    if base_batch_size <= 0 or batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {base_batch_size} and {batch_size}")
    ratio = batch_size / base_batch_size
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "linear":
        return base_lr * ratio
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown LR scaling rule {rule!r}; known: sqrt, linear, none")


# Config names (the "scheduler" block of a DeepSpeed JSON) -> builder of a multiplier function.
def _warmup(params: dict, total: int) -> int:
    if ("warmup_proportion" in params) == ("warmup_num_steps" in params):
        raise ValueError("give exactly one of warmup_proportion and warmup_num_steps")
    return resolve_warmup(total, params.get("warmup_proportion"), params.get("warmup_num_steps"))


def _poly(params: dict) -> Callable[[int], float]:
    total = int(params["total_num_steps"])
    warm = _warmup(params, total)
    return partial(poly_decay, total_steps=total, warmup_steps=warm, power=float(params.get("power", 0.5)))


def _constant(params: dict) -> Callable[[int], float]:
    total = int(params.get("total_num_steps", 0))
    warm = _warmup(params, total)
    return partial(constant_after_warmup, warmup_steps=warm)


def _exp(params: dict) -> Callable[[int], float]:
    total = int(params["total_num_steps"])
    warm = _warmup(params, total)
    return partial(warmup_exp_decay_exp, total_steps=total, warmup_steps=warm,
                   decay_rate=float(params["decay_rate"]), decay_steps=int(params["decay_steps"]),
                   degree=float(params.get("degree", 2.0)))


SCHEDULES: dict[str, Callable[[dict], Callable[[int], float]]] = {
    "WarmupPolyDecay": _poly,
    "WarmupConstant": _constant,
    "WarmupExpDecayExp": _exp,
}
_PARAMS = {
    "WarmupPolyDecay": {"total_num_steps", "warmup_proportion", "warmup_num_steps", "power"},
    "WarmupConstant": {"total_num_steps", "warmup_proportion", "warmup_num_steps"},
    "WarmupExpDecayExp": {"total_num_steps", "warmup_proportion", "warmup_num_steps", "decay_rate",
                          "decay_steps", "degree"},
}


def is_known(name: str) -> bool:
    return name in SCHEDULES


def multiplier_fn(name: str, params: dict) -> Callable[[int], float]:
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler type {name!r}; known: {sorted(SCHEDULES)}")
    unknown = set(params) - _PARAMS[name]
    if unknown:
        raise ValueError(f"scheduler {name}: unknown params {sorted(unknown)}; allowed: {sorted(_PARAMS[name])}")
    try:
        return SCHEDULES[name](params)
    except KeyError as exc:
        raise ValueError(f"scheduler {name}: missing param {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ValueError(f"scheduler {name}: {exc}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, params: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` whose multiplier follows the named schedule."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier_fn(name, params))
