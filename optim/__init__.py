"""Layer-wise large-batch optimizers (LAMB, LARS) that stay exact under DeepSpeed ZeRO.

    import optim
    engine, optimizer, _, scheduler = optim.initialize(model=model, config="ds_configs/lamb_64k.json")

(the shipped configs leave bf16 inf/NaN gradients to pretrain/run.py's step accounting,
``bf16.check_grad_overflow: false``: a loop of your own should set it to true, or check
``engine.get_global_grad_norm()`` after each step)

or, without DeepSpeed::

    opt = optim.Lamb(optim.param_groups(model, weight_decay=0.01), lr=6e-3, variant="nvidia")
"""
from ._layerwise import IMPLS, LayerwiseOptimizer
from .initialize import build_optimizer, check_config, initialize, load_config
from .lamb import VARIANTS, Lamb
from .lars import Lars
from .param_groups import no_decay_names, param_groups
from .precision import resolve_precision
from .registry import create, known, register
from .schedules import build_scheduler, scale_lr

__all__ = [
    "IMPLS", "Lamb", "Lars", "LayerwiseOptimizer", "VARIANTS", "build_optimizer", "build_scheduler", "check_config",
    "create", "initialize", "known", "load_config", "no_decay_names", "param_groups", "register",
    "resolve_precision", "scale_lr",
]
