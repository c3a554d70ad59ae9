"""``optim.initialize``: ``deepspeed.initialize`` that knows this package's optimizers.

When the config's ``optimizer.type`` is a registered name (``Lamb``, ``Lars``, ``AdamW``,
``SGD``, ...), the optimizer is built here with decay/no-decay param groups, the ``scheduler``
block is built from :mod:`optim.schedules` when its type is one of ours, and both blocks are
removed before DeepSpeed sees the config. After DeepSpeed has wrapped the optimizer, the
layer-wise ones are told where each model tensor lives in ZeRO's flat partitions
(:mod:`optim.zero`), so their trust ratios stay per layer. Any other optimizer type is left to
DeepSpeed unchanged.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Union

from . import registry, schedules, zero
from ._layerwise import LayerwiseOptimizer
from .param_groups import param_groups
from .precision import resolve_precision


def load_config(config: Union[str, Path, dict]) -> dict:
    """A deep copy of a DeepSpeed config given as a dict or a JSON file path."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FileNotFoundError(f"{path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def check_config(config: dict) -> None:
    """Refuse a bad ``optimizer`` or ``scheduler`` block before any model or process group exists:
    the optimizer and our schedules are built once on a dummy tensor, so an unknown type, keyword
    or value fails here with a ValueError that names the block."""
    import torch

    opt_cfg = config.get("optimizer")
    if opt_cfg is None:
        return
    if not isinstance(opt_cfg, dict) or "type" not in opt_cfg:
        raise ValueError("config key 'optimizer' must be an object with a 'type'")
    name, params = opt_cfg["type"], dict(opt_cfg.get("params", {}))
    if not registry.is_registered(name):
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

        if str(name).lower() not in DEEPSPEED_OPTIMIZERS:
            raise ValueError(f"optimizer.type {name!r} is unknown: registered here: {', '.join(registry.known())}; "
                             f"DeepSpeed's own: {', '.join(DEEPSPEED_OPTIMIZERS)}")
        return
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    try:
        dummy = registry.create(name, [torch.zeros(1, requires_grad=True)], **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"optimizer.params: {exc}") from None
    sched_cfg = config.get("scheduler")
    if isinstance(sched_cfg, dict) and schedules.is_known(sched_cfg.get("type", "")):
        try:
            schedules.build_scheduler(dummy, sched_cfg["type"], dict(sched_cfg.get("params", {})))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"scheduler.params: {exc}") from None


def build_optimizer(model, config: dict, model_parameters=None):
    """Optimizer (and LR scheduler, or None) for a config whose optimizer type is registered.

    ``config`` is modified: the blocks built here are removed.
    """
    opt_cfg = config.get("optimizer")
    if not isinstance(opt_cfg, dict) or "type" not in opt_cfg:
        raise ValueError("config key 'optimizer' must be an object with a 'type'")
    name = opt_cfg["type"]
    params = dict(opt_cfg.get("params", {}))
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    wd = float(params.get("weight_decay", 0.0))
    groups = model_parameters if model_parameters is not None else param_groups(model, wd)
    optimizer = registry.create(name, groups, **params)
    del config["optimizer"]

    scheduler = None
    sched_cfg = config.get("scheduler")
    if isinstance(sched_cfg, dict) and schedules.is_known(sched_cfg.get("type", "")):
        scheduler = schedules.build_scheduler(optimizer, sched_cfg["type"], dict(sched_cfg.get("params", {})))
        del config["scheduler"]

    zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if zero_stage >= 1:
        if not registry.exact_under_zero(name):
            raise ValueError(f"optimizer {name} is not known to be exact under ZeRO (stage {zero_stage})")
        if zero_stage >= 3 and isinstance(optimizer, LayerwiseOptimizer):
            raise ValueError(
                f"optimizer {name} under ZeRO stage 3 is not supported (per-tensor trust ratios need "
                "the tensor layout, which this version derives for stages 1 and 2 only); set "
                "zero_optimization.stage to 1 or 2")
        config["zero_allow_untested_optimizer"] = True

    if any(g.get("grad_pre_normalization") for g in optimizer.param_groups):
        # The optimizer clips by the global norm itself (exactly, across ranks). DeepSpeed clips
        # by default (gradient_clipping 1.0 since 0.19): doing both would clip twice.
        if float(config.get("gradient_clipping", 0) or 0) > 0:
            raise ValueError(
                "config sets gradient_clipping and the optimizer's grad_pre_normalization is on: "
                "both clip by the global gradient norm. Remove gradient_clipping (or set it to 0), "
                "or set grad_pre_normalization to false")
        config["gradient_clipping"] = 0.0
    return optimizer, scheduler


def initialize(model=None, config: Union[str, Path, dict, None] = None, model_parameters=None,
               effective: Optional[dict] = None, **kwargs: Any):
    """Drop-in for ``deepspeed.initialize``; returns ``(engine, optimizer, dataloader, scheduler)``.

    ``"auto"`` precision is resolved (:mod:`optim.precision`). With ``effective`` (a dict), it is
    filled with the configuration the run really uses: what DeepSpeed received, plus the
    optimizer and scheduler blocks built here."""
    import deepspeed

    if config is None:
        raise ValueError("optim.initialize needs config= (a DeepSpeed JSON path or dict)")
    cfg = load_config(config)
    resolve_precision(cfg)
    own_blocks = {k: copy.deepcopy(cfg[k]) for k in ("optimizer", "scheduler") if k in cfg}
    opt_type = cfg.get("optimizer", {}).get("type") if isinstance(cfg.get("optimizer"), dict) else None
    if opt_type is not None and registry.is_registered(opt_type):
        if "optimizer" in kwargs:
            raise ValueError("pass either optimizer= or an 'optimizer' block in the config, not both")
        optimizer, scheduler = build_optimizer(model, cfg, model_parameters)
        if scheduler is not None and "lr_scheduler" in kwargs:
            raise ValueError("pass either lr_scheduler= or a 'scheduler' block in the config, not both")
        kwargs["optimizer"] = optimizer
        if scheduler is not None:
            kwargs["lr_scheduler"] = scheduler
        layerwise = isinstance(optimizer, LayerwiseOptimizer)
        if layerwise:
            optimizer._skip_steps_during_wrap = True
        try:
            engine, opt, loader, sched = deepspeed.initialize(model=model, config=cfg, **kwargs)
        finally:
            if layerwise:
                optimizer._skip_steps_during_wrap = False
    else:
        if opt_type is not None:
            from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

            if opt_type.lower() not in DEEPSPEED_OPTIMIZERS:
                raise ValueError(
                    f"config optimizer.type {opt_type!r} is unknown: registered here: "
                    f"{', '.join(registry.known())}; DeepSpeed's own: {', '.join(DEEPSPEED_OPTIMIZERS)}")
        engine, opt, loader, sched = deepspeed.initialize(
            model=model, config=cfg, model_parameters=model_parameters, **kwargs)
    zero.attach(engine)
    if effective is not None:
        effective.clear()
        effective.update(copy.deepcopy(cfg), **own_blocks)
    return engine, opt, loader, sched
