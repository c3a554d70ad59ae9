"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", arXiv 1904.00962) in the variants that published BERT recipes use.

The learning rates of the recipes only carry over with the same math, so each variant is a
preset of explicit knobs (any knob passed as a keyword overrides its preset):

=========== ============== ================ =========== ================ =====================
variant     bias_correction grad pre-norm    ratio clamp adapt no-decay    source
=========== ============== ================ =========== ================ =====================
paper       moments         no               none        yes              Algorithm 2; TF-Addons
nvidia      moments         global norm, 1.0 none        no (r = 1)       NVIDIA DLE BERT, apex
deepspeed   step size       no               [0.01, 10]  yes              DeepSpeed FusedLamb
=========== ============== ================ =========== ================ =====================

With m, v the moments: ``moments`` uses m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ) and step size lr;
``step`` uses m, v as they are and step size lr·√(1−β2ᵗ)/(1−β1ᵗ); ``none`` neither.
u = m̂/(√v̂+ε) + λw (ε inside the root with ``eps_inside_sqrt``), r = ‖w‖/‖u‖ (clamped to
[min_coeff, max_coeff] when given; 1 when either norm is 0), w ← w − step·r·u.
"""
from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch

from . import _native
from ._layerwise import Bucket, LayerwiseOptimizer

VARIANTS: dict[str, dict] = {
    "paper": dict(bias_correction="moments", grad_pre_normalization=False, max_grad_norm=1.0,
                  min_coeff=None, max_coeff=None, adapt_no_decay=True, eps_inside_sqrt=False),
    "nvidia": dict(bias_correction="moments", grad_pre_normalization=True, max_grad_norm=1.0,
                   min_coeff=None, max_coeff=None, adapt_no_decay=False, eps_inside_sqrt=False),
    "deepspeed": dict(bias_correction="step", grad_pre_normalization=False, max_grad_norm=1.0,
                      min_coeff=0.01, max_coeff=10.0, adapt_no_decay=True, eps_inside_sqrt=False),
}
_BIAS_MODES = ("moments", "step", "none")


def _resolve_knobs(variant: str, knobs: dict) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown LAMB variant {variant!r}; known: {sorted(VARIANTS)}")
    resolved = dict(VARIANTS[variant])
    unknown = set(knobs) - set(resolved)
    if unknown:
        raise TypeError(f"Lamb got unknown keyword(s) {sorted(unknown)}; knobs are {sorted(resolved)}")
    resolved.update(knobs)
    bc = resolved["bias_correction"]
    if bc is True:
        bc = VARIANTS[variant]["bias_correction"]
    elif bc is False:
        bc = "none"
    if bc not in _BIAS_MODES:
        raise ValueError(f"bias_correction must be True, False or one of {_BIAS_MODES}, got {bc!r}")
    resolved["bias_correction"] = bc
    return resolved


class Lamb(LayerwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training.

    Args:
        params: tensors, or param groups (dicts; ``optim.param_groups`` builds the usual
            decay/no-decay split with names for telemetry).
        lr, betas, eps, weight_decay: as in Adam/AdamW (decoupled weight decay inside u).
        variant: ``"paper"``, ``"nvidia"`` or ``"deepspeed"`` (see module docstring).
        impl: ``"loop"``, ``"foreach"``, ``"fused"`` (C kernels on the CPU, Triton on GPUs),
            ``"triton"`` or ``None`` (= ``"fused"``; falls back to foreach, with a warning).
        keep_grads: ``False`` (default) lets ``step()`` use each ``p.grad`` as scratch space for
            the update direction, as apex's FusedLAMB does: the fused CPU step is then faster and
            the multi-tensor one needs no model-sized buffer, but the gradients hold scratch
            values after the step (DeepSpeed and the usual ``step(); zero_grad()`` loop discard
            them anyway). ``True`` leaves gradients untouched.
        **knobs: ``bias_correction``, ``grad_pre_normalization``, ``max_grad_norm``,
            ``min_coeff``, ``max_coeff``, ``adapt_no_decay``, ``eps_inside_sqrt``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, variant: str = "paper",
                 impl: Optional[str] = None, keep_grads: bool = False, **knobs) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Lamb: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        **_resolve_knobs(variant, knobs))
        self.variant = variant
        self.keep_grads = bool(keep_grads)
        super().__init__(params, defaults, impl)

    # -- global gradient norm (nvidia pre-normalization) --------------------------------
    def _grad_scale(self) -> Optional[torch.Tensor]:
        groups = [g for g in self.param_groups if g["grad_pre_normalization"]]
        if not groups:
            return None
        max_norms = {g["max_grad_norm"] for g in groups}
        if len(max_norms) != 1:
            raise ValueError(f"Lamb: param groups disagree on max_grad_norm {sorted(max_norms)}")
        if self._global_grad_norm_fn is not None:
            norm = self._global_grad_norm_fn()
            if norm is None:
                raise RuntimeError("Lamb: grad_pre_normalization needs DeepSpeed's global gradient "
                                   "norm; set zero_optimization.compute_grad_norm to true")
            norm = torch.as_tensor(norm, dtype=torch.float64)
        else:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if not grads:
                return None
            # Per-tensor norms in one multi-tensor kernel, then one float64 norm of them: a few
            # launches, not two per tensor (hundreds of them cost milliseconds on a GPU).
            norms = torch._foreach_norm(grads)
            try:
                stacked = torch.stack(norms)
            except RuntimeError:  # gradients on several devices
                stacked = torch.stack([n.to(grads[0].device) for n in norms])
            norm = torch.linalg.vector_norm(stacked.to(torch.float64))
        return 1.0 / torch.clamp(norm / max_norms.pop(), min=1.0)

    def _prepare_step(self) -> Optional[torch.Tensor]:
        return self._grad_scale()

    def _step_group(self, group: dict, buckets: list[Bucket], grad_scale: Optional[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        t = None
        bucket_states = []
        for b in buckets:
            states = [self.state[p] for p in b.params]  # one lookup per tensor and step
            for p, state in zip(b.params, states):
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            t = states[0]["step"] if t is None else t
            bucket_states.append(states)
        mode = group["bias_correction"]
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        hp = dict(beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"],
                  inv_bc1=1.0 / bc1 if mode == "moments" else 1.0,
                  inv_bc2=1.0 / bc2 if mode == "moments" else 1.0,
                  eps_inside=bool(group["eps_inside_sqrt"]))
        step_size = group["lr"] * (math.sqrt(bc2) / bc1 if mode == "step" else 1.0)

        runs = []
        for b, states in zip(buckets, bucket_states):
            ws = b.params
            gs = [p.grad for p in ws]
            ms = [s["exp_avg"] for s in states]
            vs = [s["exp_avg_sq"] for s in states]
            impl = self._choose_impl(ws + gs + ms + vs)
            gscale = None if grad_scale is None else grad_scale.to(ws[0].device, ws[0].dtype)
            scratch = None if self.keep_grads or not _grads_usable_as_scratch(ws, gs) else gs
            if impl == "triton":
                try:
                    sums, extra = _triton().lamb_pass1(b, ws, gs, ms, vs, hp, gscale, scratch)
                except _triton().PartialLaunchError:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. compilation: nothing was written yet
                    self._fast_path_failed("triton", exc)
                    impl = "foreach"
            if impl == "fused":
                sums, extra = _pass1_native(b, ws, gs, ms, vs, hp, gscale, scratch)
            elif impl == "foreach":
                sums, extra = _pass1_foreach(b, ws, gs, ms, vs, hp, gscale, scratch)
            elif impl == "loop":
                sums, extra = _pass1_loop(b, ws, gs, ms, vs, hp, gscale)
            runs.append((b, impl, ws, ms, vs, extra, sums))

        totals = self._reduce(buckets, [r[-1] for r in runs])
        w_norm, u_norm = totals[0].sqrt(), totals[1].sqrt()
        ratio = w_norm / u_norm
        if group["min_coeff"] is not None or group["max_coeff"] is not None:
            ratio = ratio.clamp(min=group["min_coeff"], max=group["max_coeff"])
        ratio = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        if group["weight_decay"] == 0 and not group["adapt_no_decay"]:
            ratio = torch.ones_like(ratio)
        self._remember(group, ratio)

        scaled = ratio * -step_size
        for b, impl, ws, ms, vs, extra, _ in runs:
            if impl == "triton":
                try:
                    _triton().lamb_pass2(b, ws, ms, vs, extra, scaled)
                    continue
                except _triton().PartialLaunchError:
                    raise
                except Exception as exc:  # noqa: BLE001 - finish this step with foreach
                    self._fast_path_failed("triton", exc)
                    hp_, us = extra
                    extra = us if us is not None else [_update_direction(m, v, w, hp_) for m, v, w in zip(ms, vs, ws)]
                    impl = "foreach"
            if impl == "fused":
                _pass2_native(b, ws, ms, vs, extra, scaled)
            else:
                scale = scaled.index_select(0, b.seg_keys_tensor(scaled.device)).to(ws[0].device, ws[0].dtype)
                if impl == "loop":
                    _pass2_loop(b, ws, extra, scale)
                else:
                    _pass2_foreach(b, ws, extra, scale)


def _triton():
    from . import _triton as module  # imported on first GPU step: triton is optional

    return module


def _grads_usable_as_scratch(ws, gs) -> bool:
    """u may go into the gradients when each is a contiguous tensor of its weight's dtype and
    shape (not, e.g., bf16 gradients of fp32 weights), no two are the same tensor (it would
    receive two tensors' u), and none is part of an autograd graph (``create_graph=True``).
    Otherwise the fused step recomputes u in pass 2 and the multi-tensor one keeps a buffer."""
    for g, w in zip(gs, ws):
        if g.dtype != w.dtype or g.shape != w.shape or g.requires_grad or not g.is_contiguous():
            return False
    ptrs = [ptr for ptr, n in zip(map(torch.Tensor.data_ptr, gs), map(torch.Tensor.numel, gs)) if n]
    return len(set(ptrs)) == len(ptrs)


# ---------------------------------------------------------------------------------------
# Functional passes. Pass 1 updates the moments and returns [2, num_segments] float64 sums of
# w² and u² (plus what pass 2 needs); pass 2 applies w += scale_segment * u.
# ---------------------------------------------------------------------------------------

def _update_direction(m, v, w, hp):
    denom = (v * hp["inv_bc2"] + hp["eps"]).sqrt() if hp["eps_inside"] else (v * hp["inv_bc2"]).sqrt() + hp["eps"]
    u = (m * hp["inv_bc1"]) / denom
    if hp["wd"] != 0:
        u = u + hp["wd"] * w
    return u


def _pass1_loop(b: Bucket, ws, gs, ms, vs, hp, gscale):
    """Reference: one tensor at a time, u kept for pass 2."""
    us, sums = [], []
    for w, g, m, v, lay in zip(ws, gs, ms, vs, b.layouts):
        if gscale is not None:
            g = g * gscale
        m.mul_(hp["beta1"]).add_(g, alpha=1 - hp["beta1"])
        v.mul_(hp["beta2"]).addcmul_(g, g, value=1 - hp["beta2"])
        u = _update_direction(m, v, w, hp)
        us.append(u)
        for s, n in zip(lay.starts, lay.lengths):
            w_seg = w.reshape(-1).narrow(0, s, n).to(torch.float64)
            u_seg = u.reshape(-1).narrow(0, s, n).to(torch.float64)
            sums.append(torch.stack([(w_seg * w_seg).sum(), (u_seg * u_seg).sum()]))
    sums = torch.stack(sums, dim=1)
    return (sums, b.seg_keys_tensor(sums.device)), us


def _pass2_loop(b: Bucket, ws, us, scale):
    i = 0
    for w, u, lay in zip(ws, us, b.layouts):
        for s, n in zip(lay.starts, lay.lengths):
            w.reshape(-1).narrow(0, s, n).add_(u.reshape(-1).narrow(0, s, n) * scale[i])
            i += 1


def _pass1_foreach(b: Bucket, ws, gs, ms, vs, hp, gscale, scratch=None):
    """Multi-tensor: the same math as ``_pass1_loop`` with one kernel per op over all tensors.

    u is built in place, in ``scratch`` (the gradients, once the moments have used them) or in a
    buffer kept on the bucket: a fresh model-sized temporary every step costs page faults that
    double the step time on the CPU.
    """
    if gscale is not None:
        if scratch is not None:
            torch._foreach_mul_(gs, gscale)
        else:
            gs = torch._foreach_mul(gs, gscale)
    torch._foreach_mul_(ms, hp["beta1"])
    torch._foreach_add_(ms, gs, alpha=1 - hp["beta1"])
    torch._foreach_mul_(vs, hp["beta2"])
    torch._foreach_addcmul_(vs, gs, gs, value=1 - hp["beta2"])
    if scratch is None and b.scratch is None:
        b.scratch = [torch.empty_like(w) for w in ws]
    us = scratch if scratch is not None else b.scratch
    torch._foreach_copy_(us, vs)
    torch._foreach_mul_(us, hp["inv_bc2"])
    if hp["eps_inside"]:
        torch._foreach_add_(us, hp["eps"])
        torch._foreach_sqrt_(us)
    else:
        torch._foreach_sqrt_(us)
        torch._foreach_add_(us, hp["eps"])
    torch._foreach_reciprocal_(us)
    torch._foreach_mul_(us, ms)
    torch._foreach_mul_(us, hp["inv_bc1"])
    if hp["wd"] != 0:
        torch._foreach_add_(us, ws, alpha=hp["wd"])
    w_norms = torch._foreach_norm(b.segment_views(ws))
    u_norms = torch._foreach_norm(b.segment_views(us))
    sums = torch.stack([torch.stack(w_norms), torch.stack(u_norms)]).to(torch.float64).square()
    return (sums, b.seg_keys_tensor(sums.device)), us


def _pass2_foreach(b: Bucket, ws, us, scale):
    u_views = b.segment_views(us)
    torch._foreach_mul_(u_views, list(scale.unbind()))
    torch._foreach_add_(b.segment_views(ws), u_views)


def _native_hparams(hp, gscale) -> _native.LambHparams:
    return _native.LambHparams(
        beta1=hp["beta1"], beta2=hp["beta2"], one_minus_beta1=1.0 - hp["beta1"],
        one_minus_beta2=1.0 - hp["beta2"], grad_scale=1.0 if gscale is None else float(gscale),
        inv_bc1=hp["inv_bc1"], inv_bc2=hp["inv_bc2"], eps=hp["eps"], weight_decay=hp["wd"],
        eps_inside_sqrt=int(hp["eps_inside"]))


def _pass1_native(b: Bucket, ws, gs, ms, vs, hp, gscale, scratch):
    """C/OpenMP: moments updated and sums taken in one sweep; u stored into ``scratch`` (the
    gradients) when given, else recomputed by pass 2."""
    plan = b.block_plan()
    sums = torch.empty(2, plan.nblk, dtype=torch.float64)
    ptrs = [_native.pointers(x) for x in (ws, gs, ms, vs)]
    u_ptrs = ptrs[1] if scratch is not None else None
    h = _native_hparams(hp, gscale)
    _native.library().lamb_pass1(*plan.args(), *(p.ctypes.data for p in ptrs),
                                 None if u_ptrs is None else u_ptrs.ctypes.data, sums[0].data_ptr(),
                                 sums[1].data_ptr(), ctypes.byref(h), _native.num_threads())
    return (sums, plan.key), (hp, scratch)


def _pass2_native(b: Bucket, ws, ms, vs, pass1_out, scaled_ratio):
    hp, us = pass1_out
    plan = b.block_plan()
    blk_scale = scaled_ratio.to(torch.float32).index_select(0, plan.key)
    lib = _native.library()
    if us is not None:
        ptrs = [_native.pointers(x) for x in (ws, us)]
        lib.lamb_apply(*plan.args(), *(p.ctypes.data for p in ptrs), blk_scale.data_ptr(), _native.num_threads())
        return
    h = _native_hparams(hp, None)
    ptrs = [_native.pointers(x) for x in (ws, ms, vs)]
    lib.lamb_pass2(*plan.args(), *(p.ctypes.data for p in ptrs), blk_scale.data_ptr(),
                   ctypes.byref(h), _native.num_threads())
