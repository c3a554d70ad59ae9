"""The gradient noise scale of a run, from gradients its steps compute anyway.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162): beyond a
batch of about B_simple = tr(Σ)/|G|² samples, more samples per step stop buying proportionally
fewer steps. Their Appendix A estimates |G|² and tr(Σ) without bias from squared gradient norms
at two batch sizes b < B, since E|G_b|² = |G|² + tr(Σ)/b:

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)         tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

A data-parallel step with accumulation has both for free: every micro-batch's gradient (b = the
micro batch, seen by a hook on each parameter before it is accumulated; averaged over all
micro-batches of all ranks) and the step's reduced gradient (B = the global batch; its norm is
the one DeepSpeed computes for the step, or ours from the all-reduced gradients without ZeRO).
A step needs at least two micro-batches in all (accumulation or ranks). Single estimates are
noisy (|G|² is a small difference of two noisy numbers), so, as the appendix does, exponential
moving averages of |G|² and tr(Σ) are kept separately and B_simple is their ratio; the error
bar is a jackknife over the last ``window`` measurements.

Only every ``every``-th step is measured: the hooks (one norm kernel per parameter and
micro-batch; on GPUs it reads the gradient in its own precision and accumulates in fp32: no copy)
are attached for that step alone, and one 2-number all-reduce is added. Nothing is read back to
the host until the next log line, and no tensor is built from host data on the way.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch


class NoiseScale:
    def __init__(self, engine, *, every: int, ema: float, micro: int, glob: int, accum: int,
                 all_reduce=None, window: int = 20) -> None:
        self.engine = engine
        self.every, self.beta = every, ema
        self.b, self.B, self.accum = micro, glob, accum
        self.all_reduce = all_reduce
        self.enabled = every > 0 and glob > micro
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        device = engine.device
        self._norms: list[torch.Tensor] = []  # this micro-batch's per-parameter gradient norms
        # GPUs read bf16/fp16 gradients in place when a norm accumulates in fp32 (no copy), and sum
        # in a tree; the CPU kernel copies to the accumulation type and sums serially, off by ~1e-3
        # over tens of millions of fp32 elements: fp64 there.
        self._norm_dtype = torch.float64 if device.type == "cpu" else torch.float32
        self._small = torch.zeros(2, dtype=torch.float64, device=device)  # sum of |g_k|², count (this rank)
        self._own_big: Optional[torch.Tensor] = None
        self._handles: list = []
        self._scale = 1.0
        self.ema_g2 = torch.zeros((), dtype=torch.float64, device=device)
        self.ema_s = torch.zeros((), dtype=torch.float64, device=device)
        self.weight = 0.0  # for the EMAs' bias correction (as Adam's)
        self.measurements = 0
        self.recent: deque = deque(maxlen=window)  # (g2, s) device tensors of the last measurements

    # -- per step --------------------------------------------------------------------------------
    def begin_step(self, step: int, loss_scale: Optional[float] = None) -> None:
        """Call before the micro-batches of optimizer step ``step`` (1-based), with the fp16 loss
        scale they will be scaled by (None without fp16)."""
        self._scale = loss_scale or 1.0
        measure = self.enabled and step % self.every == 0
        if measure and not self._handles:
            self._handles = [p.register_hook(self._hook) for p in self.params]
        elif not measure and self._handles:
            self.detach()
        self._small.zero_()
        self._own_big = None

    def _hook(self, grad: torch.Tensor) -> None:
        self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=self._norm_dtype))

    def end_micro(self, boundary: bool) -> None:
        """After each ``engine.backward``; at the accumulation boundary without ZeRO the gradients
        are all-reduced by now, and their norm is the big-batch one."""
        if not self._handles:
            return
        if self._norms:  # |g_k|² of this micro-batch, from its per-parameter norms
            micro_sq = torch.stack(self._norms).double().square().sum()
            self._small += torch.stack([micro_sq, torch.ones_like(micro_sq)])
            self._norms = []
        if boundary and self.engine.zero_optimization_stage() == 0:
            grads = [p.grad for p in self.params if p.grad is not None]
            if len(grads) == len(self.params):  # else DeepSpeed's wrapper holds them: its norm is used
                self._own_big = torch.stack(torch._foreach_norm(grads)).double().square().sum()

    def end_step(self, applied: bool) -> None:
        """After ``engine.step`` at the boundary; a step the fp16 scaler skipped is not measured."""
        if not self._handles or not applied:
            return
        scale = self._scale
        # The hooks saw DeepSpeed's scaled micro-batch gradients: (loss scale / accumulation) x grad.
        unscale = (self.accum / scale) ** 2
        small = self._small.clone()
        if self.all_reduce is not None:
            self.all_reduce(small)
        g_small = small[0] / small[1] * unscale
        if self._own_big is not None:
            g_big = self._own_big / scale ** 2
        else:
            norm = self.engine.get_global_grad_norm()
            if norm is None:
                return
            if torch.is_tensor(norm) and norm.device.type == g_small.device.type:
                g_big = norm.to(g_small.device, torch.float64) ** 2
            else:  # a float, or a host tensor (already synchronised): a fill, not a copy
                g_big = g_small.new_full((), float(norm)) ** 2
        b, B = float(self.b), float(self.B)
        g2 = (B * g_big - b * g_small) / (B - b)
        s = (g_small - g_big) / (1.0 / b - 1.0 / B)
        self.ema_g2.mul_(self.beta).add_(g2, alpha=1 - self.beta)
        self.ema_s.mul_(self.beta).add_(s, alpha=1 - self.beta)
        self.weight = self.beta * self.weight + (1 - self.beta)
        self.measurements += 1
        self.recent.append(torch.stack([g2, s]))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- what the log reads (a log step synchronises anyway) ------------------------------------
    def record(self) -> dict:
        if not self.measurements:
            return {}
        g2 = self.ema_g2.item() / self.weight
        s = self.ema_s.item() / self.weight
        # |G|² not yet positive (early, noisy averages): the noise scale is not resolved yet
        out = {"gns_g2": g2, "gns_trace": s, "gns_b_simple": s / g2 if g2 > 0 else None,
               "gns_measurements": self.measurements}
        err = self.jackknife()
        if err is not None:
            out["gns_b_simple_err"] = err
        return out

    def jackknife(self) -> Optional[float]:
        """Standard error of sum(s)/sum(g2) over the recent measurements (leave-one-out)."""
        if len(self.recent) < 3:
            return None
        vals = torch.stack(list(self.recent)).tolist()
        n = len(vals)
        tot_g2, tot_s = sum(v[0] for v in vals), sum(v[1] for v in vals)
        loo = [(tot_s - s) / (tot_g2 - g) for g, s in vals if tot_g2 - g > 0]
        if len(loo) < n:
            return None
        mean = sum(loo) / n
        return math.sqrt((n - 1) / n * sum((x - mean) ** 2 for x in loo))
