"""LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks",
arXiv 1708.03888): momentum SGD whose step for each tensor is scaled by a local learning rate

    rate = η·‖w‖ / (‖g‖ + λ‖w‖ + eps)       (1 when ‖w‖ or ‖g‖ is 0)
    buf ← μ·buf + rate·(g + λw);  w ← w − lr·buf

Adaptation is a per-group switch, ``adapt`` (default True), independent of weight decay: plain
``Lars(model.parameters(), lr)`` adapts every tensor. ``optim.param_groups`` puts biases and
normalisation weights in a group with ``adapt=False``, excluded from decay and adaptation as in
the LARS paper's and TensorFlow's TPU implementation. Those take rate = η here, i.e. momentum SGD
at ``lr·η`` (the step an adapted tensor takes when ‖w‖ = ‖g‖), where TensorFlow's takes the full
``lr``: at the LARS learning rates of the BERT comparisons (1 to 6), plain momentum SGD at the full
rate sends those tensors off (the first scaling miniature ran them at 5.66). This is the baseline
the LAMB paper compares against on BERT.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _native
from ._layerwise import Bucket, LayerwiseOptimizer


class Lars(LayerwiseOptimizer):
    """Layer-wise Adaptive Rate Scaling over momentum SGD (see module docstring)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0, impl: Optional[str] = None) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError("Lars: lr, momentum, weight_decay, eps must be >= 0 and trust_coefficient > 0 "
                             f"(got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"trust_coefficient={trust_coefficient}, eps={eps})")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, adapt=True)
        super().__init__(params, defaults, impl)

    def _step_group(self, group: dict, buckets: list[Bucket], _prepared=None) -> None:
        wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
        runs = []
        for b in buckets:
            ws = b.params
            gs = [p.grad for p in ws]
            bufs = []
            for p in ws:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            impl = self._choose_impl(ws + gs + bufs)
            if impl == "triton":
                try:
                    sums = _triton().sumsq2(b, ws, gs)
                except _triton().PartialLaunchError:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. compilation: nothing was written
                    self._fast_path_failed("triton", exc)
                    impl = "foreach"
            if impl == "fused":
                sums = _sums_native(b, ws, gs)
            elif impl == "loop":
                sums = _sums_loop(b, ws, gs)
            elif impl == "foreach":
                sums = _sums_foreach(b, ws, gs)
            runs.append((b, impl, ws, gs, bufs, sums))

        totals = self._reduce(buckets, [r[-1] for r in runs])
        w_norm, g_norm = totals[0].sqrt(), totals[1].sqrt()
        rate = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
        rate = torch.where((w_norm > 0) & (g_norm > 0), rate, torch.ones_like(rate))
        if not group.get("adapt", True):
            rate = torch.full_like(rate, group["trust_coefficient"])
        self._remember(group, rate)

        for b, impl, ws, gs, bufs, _ in runs:
            if impl == "triton":
                try:
                    _triton().lars_apply(b, ws, gs, bufs, rate, mom, wd, lr)
                    continue
                except _triton().PartialLaunchError:
                    raise
                except Exception as exc:  # noqa: BLE001 - finish this step with foreach
                    self._fast_path_failed("triton", exc)
                    impl = "foreach"
            if impl == "fused":
                _apply_native(b, ws, gs, bufs, rate, mom, wd, lr)
                continue
            seg_rate = rate.index_select(0, b.seg_keys_tensor(rate.device))
            if impl == "loop":
                _apply_loop(b, ws, gs, bufs, seg_rate.to(ws[0].device, ws[0].dtype), mom, wd, lr)
            else:
                _apply_foreach(b, ws, gs, bufs, seg_rate.to(ws[0].device, ws[0].dtype), mom, wd, lr)


def _triton():
    from . import _triton as module  # imported on first GPU step: triton is optional

    return module


def _sums_loop(b: Bucket, ws, gs):
    sums = []
    for w, g, lay in zip(ws, gs, b.layouts):
        for s, n in zip(lay.starts, lay.lengths):
            w_seg = w.reshape(-1).narrow(0, s, n).to(torch.float64)
            g_seg = g.reshape(-1).narrow(0, s, n).to(torch.float64)
            sums.append(torch.stack([(w_seg * w_seg).sum(), (g_seg * g_seg).sum()]))
    sums = torch.stack(sums, dim=1)
    return sums, b.seg_keys_tensor(sums.device)


def _apply_loop(b: Bucket, ws, gs, bufs, rate, mom, wd, lr):
    i = 0
    for w, g, buf, lay in zip(ws, gs, bufs, b.layouts):
        for s, n in zip(lay.starts, lay.lengths):
            w_seg, g_seg, buf_seg = (x.reshape(-1).narrow(0, s, n) for x in (w, g, buf))
            buf_seg.mul_(mom).add_((g_seg + wd * w_seg) * rate[i])
            w_seg.add_(buf_seg, alpha=-lr)
            i += 1


def _sums_foreach(b: Bucket, ws, gs):
    w_norms = torch._foreach_norm(b.segment_views(ws))
    g_norms = torch._foreach_norm(b.segment_views(gs))
    sums = torch.stack([torch.stack(w_norms), torch.stack(g_norms)]).to(torch.float64).square()
    return sums, b.seg_keys_tensor(sums.device)


def _apply_foreach(b: Bucket, ws, gs, bufs, rate, mom, wd, lr):
    w_views, buf_views = b.segment_views(ws), b.segment_views(bufs)
    d = torch._foreach_add(b.segment_views(gs), w_views, alpha=wd) if wd else \
        torch._foreach_mul(b.segment_views(gs), 1.0)
    torch._foreach_mul_(d, list(rate.unbind()))
    torch._foreach_mul_(buf_views, mom)
    torch._foreach_add_(buf_views, d)
    torch._foreach_add_(w_views, buf_views, alpha=-lr)


def _sums_native(b: Bucket, ws, gs):
    plan = b.block_plan()
    sums = torch.empty(2, plan.nblk, dtype=torch.float64)
    pw, pg = _native.pointers(ws), _native.pointers(gs)
    _native.library().sumsq2(*plan.args(), pw.ctypes.data, pg.ctypes.data, sums[0].data_ptr(),
                             sums[1].data_ptr(), 1.0, _native.num_threads())
    return sums, plan.key


def _apply_native(b: Bucket, ws, gs, bufs, rate, mom, wd, lr):
    plan = b.block_plan()
    blk_rate = rate.to(torch.float32).index_select(0, plan.key)
    pw, pg, pb = (_native.pointers(x) for x in (ws, gs, bufs))
    _native.library().lars_pass2(*plan.args(), pw.ctypes.data, pg.ctypes.data, pb.ctypes.data,
                                 blk_rate.data_ptr(), mom, wd, lr, _native.num_threads())
