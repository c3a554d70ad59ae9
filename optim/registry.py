"""Optimizer names usable in a DeepSpeed JSON ``"optimizer": {"type": NAME, "params": {...}}``.

Names are matched case-insensitively (DeepSpeed's own names are too). Extend with::

    @optim.register("MyOpt")
    def _make(params, **kw): return MyOpt(params, **kw)
"""
from __future__ import annotations

from typing import Callable

import torch

from .lamb import Lamb
from .lars import Lars

Factory = Callable[..., torch.optim.Optimizer]
_REGISTRY: dict[str, tuple[str, Factory, bool]] = {}


def register(name: str, *, exact_under_zero: bool = True) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(params, **config_params)`` under ``name``.

    ``exact_under_zero``: the optimizer is element-wise, or layer-wise through
    ``optim.LayerwiseOptimizer``, so ZeRO's flat partitions give the same result; only then does
    ``optim.initialize`` allow it under ZeRO.
    """
    def deco(factory: Factory) -> Factory:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"optimizer {name!r} is already registered")
        _REGISTRY[key] = (name, factory, exact_under_zero)
        return factory
    return deco


def known() -> list[str]:
    return sorted(display for display, _, _ in _REGISTRY.values())


def is_registered(name: str) -> bool:
    return isinstance(name, str) and name.lower() in _REGISTRY


def exact_under_zero(name: str) -> bool:
    return _lookup(name)[2]


def _lookup(name: str):
    try:
        return _REGISTRY[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(known())}") from None


def create(name: str, params, **kwargs) -> torch.optim.Optimizer:
    display, factory, _ = _lookup(name)
    try:
        return factory(params, **kwargs)
    except TypeError as exc:
        raise TypeError(f"optimizer {display}: bad params {sorted(kwargs)}: {exc}") from None


register("Lamb")(Lamb)
register("Lars")(Lars)


@register("AdamW")
def _adamw(params, **kw):
    return torch.optim.AdamW(params, **kw)


@register("SGD")
def _sgd(params, **kw):
    return torch.optim.SGD(params, **kw)
