"""Make layer-wise optimizers exact under DeepSpeed's flattening optimizer wrappers.

ZeRO stage 1/2 (``DeepSpeedZeroOptimizer``) and the bf16 optimizer (``BF16_Optimizer``) give
the inner optimizer one flat fp32 partition per param group and rank, and link every model
parameter to its fragment there (``param._hp_mapping``). From those links we build, per flat
tensor, the segments of each model tensor (:class:`optim._layout.FlatLayout`) and hand them to
the optimizer, which then reduces per-tensor sums of squares across the data-parallel group
(one collective per param group and step). Without ZeRO, fp16/bf16 training wraps non-fused
optimizers in ``FP16_UnfusedOptimizer``, which keeps one fp32 copy per model tensor: each copy
is a whole tensor, and only its name must be mapped.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._layerwise import LayerwiseOptimizer
from ._layout import FlatLayout


class ZeroLayoutError(RuntimeError):
    pass


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _dp_group(wrapper, group_index: int):
    for attr in ("real_dp_process_group", "dp_process_group"):
        groups = getattr(wrapper, attr, None)
        if groups is None:
            continue
        if isinstance(groups, (list, tuple)):
            return groups[group_index]
        return groups
    return None


def attach(engine) -> bool:
    """Wire ``engine.basic_optimizer`` (a layer-wise optimizer) to the engine's flat layout.

    Returns True when a wrapper was found and layouts attached, False when the optimizer steps
    the model tensors directly (nothing to do). Raises for ZeRO stage 3, which is refused.
    """
    basic = getattr(engine, "basic_optimizer", None)
    wrapper = engine.optimizer
    if not isinstance(basic, LayerwiseOptimizer) or wrapper is basic:
        return False
    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise ZeroLayoutError(
            f"{type(basic).__name__} under ZeRO stage 3 is not supported: stage 3 partitions every "
            "tensor and the per-tensor trust ratios would need a layout this version does not "
            "derive. Use ZeRO stage 1 or 2 (optimizer state and gradients are still partitioned).")

    if getattr(wrapper, "cpu_offload", False) and hasattr(basic, "keep_grads"):
        # With the optimizer offloaded, ZeRO keeps one pinned fp32 gradient buffer for the whole
        # run and refreshes only the fragments of parameters that received a gradient: scratch
        # written into it would stand in for the gradient of a parameter unused in a step.
        basic.keep_grads = True

    named = list(engine.module.named_parameters())
    names = [n for n, _ in named]
    key_of = {id(p): k for k, (_, p) in enumerate(named)}
    n_groups = len(basic.param_groups)
    segments: dict[int, list[tuple[int, int, int]]] = {i: [] for i in range(n_groups)}
    group_keys: dict[int, list[int]] = {i: [] for i in range(n_groups)}
    linked = [p for _, p in named if getattr(p, "_hp_mapping", None) is not None]
    lp_groups = _lp_groups(wrapper)
    if lp_groups is not None:
        for i, lps in enumerate(lp_groups):
            group_keys[i] = [key_of[id(p)] for p in lps if id(p) in key_of]

    if hasattr(wrapper, "fp32_groups") and lp_groups is not None and not linked:
        # FP16_UnfusedOptimizer: fp32_groups[i][j] is the full-precision copy of lp_groups[i][j].
        layouts = {}
        for fp32s, lps in zip(wrapper.fp32_groups, lp_groups):
            for hp, lp in zip(fp32s, lps):
                layouts[id(hp)] = FlatLayout(keys=[key_of[id(lp)]], starts=[0], lengths=[hp.numel()])
        keys_by_group = {id(g["params"][0]): [key_of[id(lp)] for lp in lps]
                         for g, lps in zip(basic.param_groups, lp_groups) if g["params"]}
        basic.attach_layouts(layouts, names, keys_by_group)  # whole tensors: norms are local
        return True
    if not (linked or hasattr(wrapper, "single_partition_of_fp32_groups")):
        raise ZeroLayoutError(
            f"{type(basic).__name__}: cannot find the tensor layout inside DeepSpeed's "
            f"{type(wrapper).__name__}; refusing to compute trust ratios over flat partitions")
    flats = [g["params"][0] for g in basic.param_groups]
    if any(len(g["params"]) != 1 for g in basic.param_groups):
        raise ZeroLayoutError(f"unexpected wrapper {type(wrapper).__name__}: param groups are not flat")
    ptr_to_group = {_storage_ptr(f): i for i, f in enumerate(flats)}
    for p in linked:
        hp = p._hp_mapping.hp_fragment
        i = ptr_to_group.get(_storage_ptr(hp))
        if i is None:
            raise ZeroLayoutError(f"parameter {names[key_of[id(p)]]}: fragment not in any flat partition")
        start = (hp.data_ptr() - flats[i].data_ptr()) // hp.element_size()
        segments[i].append((key_of[id(p)], int(start), hp.numel()))

    layouts: dict[int, FlatLayout] = {}
    keys_by_group: dict[int, list[int]] = {}
    for i, flat in enumerate(flats):
        segs = sorted(segments[i], key=lambda s: s[1])
        layouts[id(flat)] = FlatLayout(
            keys=[s[0] for s in segs], starts=[s[1] for s in segs], lengths=[s[2] for s in segs],
            process_group=_dp_group(wrapper, i), partitioned=True)
        keys_by_group[id(flat)] = group_keys[i] or [s[0] for s in segs]
    basic.attach_layouts(layouts, names, keys_by_group, global_grad_norm_fn=lambda: _global_norm(wrapper))
    return True


def _lp_groups(wrapper) -> Optional[list[list[torch.Tensor]]]:
    for attr in ("bit16_groups", "bf16_groups", "fp16_groups"):
        groups = getattr(wrapper, attr, None)
        if groups:
            return groups
    return None


def _global_norm(wrapper):
    """The unclipped global gradient norm (all ranks, all groups) the wrapper computed this step."""
    return getattr(wrapper, "_global_grad_norm", None)
