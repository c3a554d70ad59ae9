"""Triton kernels of the layer-wise optimizers: the GPU counterpart of ``csrc/layerwise_cpu.c``.

The same two passes as the C kernels, over any bucket (a list of tensors, whole model tensors or
flat ZeRO partitions holding segments of many):

* the bucket is cut into blocks of ``BLOCK`` elements that never straddle a segment, so each
  block belongs to one model tensor (``Plan``: block -> tensor of the list, offset, length, key);
* pass 1 runs one program per block and writes the block's float32 sums of squares; the caller
  adds them per model tensor in float64 (``LayerwiseOptimizer._reduce``), across ranks for ZeRO;
* pass 2 applies each tensor's scale, read from a device tensor indexed by the block's key.

Tensors are reached through a device table of their addresses (one launch for the whole
bucket, as apex's multi-tensor kernels). Everything that changes from step to step (learning
rate, bias corrections) is a float argument, which Triton never specialises on, and what is
computed on the device (the global-norm clipping factor, the trust ratios) is read there through
a pointer: a step neither synchronises with the host nor compiles a new kernel variant.

On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before this module is imported), which is how the test suite checks their math.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001 - any import failure means: not available
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

BLOCK = 4096
ALIGN = 16      # elements: an even block starts at a multiple (64 bytes in fp32, 32 in bf16)
SPLIT_EVEN = True   # read full blocks without masks (measured on an H100: see bench/gpu_check.py)
HINTS = True        # and tell the compiler they are 16-byte aligned, for vector loads
NUM_WARPS = 8
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernels can run on ``device``, else why not."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if device.type == "cpu" and not _INTERPRET:
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before import)"
    if device.type not in ("cpu", "cuda", "xpu"):
        return f"no Triton backend for {device.type} tensors"
    return None


def compiled_variants() -> int:
    """Kernel variants compiled so far, all kernels and devices (a step must not add any)."""
    n = 0
    for k in _KERNELS:
        cache = getattr(k, "device_caches", None) or getattr(k, "cache", None) or {}
        for per_device in cache.values():
            entries = per_device[0] if isinstance(per_device, tuple) else per_device
            n += len(entries)
    return n


def supported_dtypes() -> tuple:
    return tuple(_DTYPES)


_DTYPES = {}
if tl is not None:
    _DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class Plan:
    """Blocks of a bucket as device arrays: ``tensor`` (index in the list), ``offset``, ``length``
    and ``key`` (model tensor: where the sums go, which scale applies).

    The first ``n_even`` blocks are full (``BLOCK`` elements) and start at a multiple of
    ``ALIGN`` elements: the kernels read them without masks and, when every tensor starts on a
    16-byte boundary, with 16-byte loads. The rest (a segment's unaligned head and its tail) are
    read with masks by a second launch."""

    def __init__(self, layouts, device: torch.device) -> None:
        even: list[tuple] = []
        ragged: list[tuple] = []
        for i, lay in enumerate(layouts):
            for k, s, n in zip(lay.keys, lay.starts, lay.lengths):
                end = s + n
                a = min(end, -(-s // ALIGN) * ALIGN)
                if a > s:
                    ragged.append((np.array([s]), np.array([a - s]), i, k))
                nfull = (end - a) // BLOCK
                if nfull:
                    even.append((a + BLOCK * np.arange(nfull, dtype=np.int64), np.full(nfull, BLOCK), i, k))
                tail = a + nfull * BLOCK
                if tail < end:
                    ragged.append((np.array([tail]), np.array([end - tail]), i, k))
        parts = even + ragged
        self.n_even = int(sum(len(p[0]) for p in even))
        self.nblk = int(sum(len(p[0]) for p in parts))

        def array(values, dtype):
            host = np.concatenate(values).astype(dtype) if values else np.zeros(0, dtype=dtype)
            return torch.from_numpy(host).to(device)

        self.offset = array([p[0] for p in parts], np.int64)
        self.length = array([p[1] for p in parts], np.int32)
        self.tensor = array([np.full(len(p[0]), p[2]) for p in parts], np.int32)
        self.key = array([np.full(len(p[0]), p[3]) for p in parts], np.int64)
        self._tables: dict[tuple, tuple[torch.Tensor, bool]] = {}
        self.checked: set[tuple] = set()  # lists of tensors already checked by _check

    def table_aligned(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """(device array of the tensors' addresses, whether all start on 16 bytes), cached by
        address (gradients may move from step to step)."""
        ptrs = tuple(map(torch.Tensor.data_ptr, tensors))
        entry = self._tables.get(ptrs)
        if entry is None:
            if len(self._tables) > 8:
                self._tables.clear()
            host = torch.tensor(ptrs, dtype=torch.int64)
            device = tensors[0].device
            if device.type != "cpu":
                host = host.pin_memory()  # so the copy does not wait for the GPU
            entry = self._tables[ptrs] = (host.to(device, non_blocking=True), all(p % 16 == 0 for p in ptrs))
        return entry

    def launches(self):
        """(grid size, first block, EVEN) of the two launches that cover the blocks."""
        out = []
        if self.n_even:
            out.append((self.n_even, 0, SPLIT_EVEN))
        if self.nblk > self.n_even:
            out.append((self.nblk - self.n_even, self.n_even, False))
        return out


def plan_of(bucket) -> Plan:
    plan = getattr(bucket, "triton_plan", None)
    if plan is None:
        plan = bucket.triton_plan = Plan(bucket.layouts, bucket.params[0].device)
    return plan


def _check(tensors: list[torch.Tensor], dtype: torch.dtype, plan: Optional[Plan] = None) -> None:
    """Contiguous tensors of ``dtype``; with ``plan``, a list seen before (same tensors) passes at
    once: weights and optimizer state do not change from step to step, gradients may."""
    key = tuple(map(id, tensors)) if plan is not None else None
    if key is not None and key in plan.checked:
        return
    for t in tensors:
        if t.dtype != dtype or not t.is_contiguous():
            raise TypeError(f"Triton kernels need contiguous tensors of one dtype ({dtype}), got {t.dtype}"
                            f"{'' if t.is_contiguous() else ' non-contiguous'}")
    if key is not None:
        plan.checked.add(key)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
_KERNELS: list = []

if triton is not None:

    @triton.jit
    def _at(tab, t, off, DT: tl.constexpr, EVEN: tl.constexpr, HINT: tl.constexpr):
        """Pointer to element ``off`` of tensor ``t`` of address table ``tab``."""
        base = tl.load(tab + t).to(tl.pointer_type(DT))
        if EVEN and HINT:
            base = tl.multiple_of(base, 16)
            off = tl.multiple_of(off, 16)
        return base + off

    @triton.jit
    def _ld(p, idx, mask, EVEN: tl.constexpr):
        if EVEN:
            x = tl.load(p + idx)
        else:
            x = tl.load(p + idx, mask=mask, other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _st(p, idx, x, mask, DT: tl.constexpr, EVEN: tl.constexpr):
        if EVEN:
            tl.store(p + idx, x.to(DT))
        else:
            tl.store(p + idx, x.to(DT), mask=mask)

    @triton.jit
    def _lamb_direction(m, v, w, inv_bc1, inv_bc2, eps, wd, EPS_INSIDE: tl.constexpr):
        if EPS_INSIDE:
            denom = tl.sqrt(v * inv_bc2 + eps)
        else:
            denom = tl.sqrt(v * inv_bc2) + eps
        return (m * inv_bc1) / denom + wd * w

    @triton.jit
    def lamb_pass1_kernel(w_tab, g_tab, m_tab, v_tab, blk_tensor, blk_offset, blk_length, sums, nblk, first,
                          gscale_ptr, beta1, beta2, one_minus_beta1, one_minus_beta2, inv_bc1, inv_bc2, eps, wd,
                          DT: tl.constexpr, HAS_GSCALE: tl.constexpr, STORE_U: tl.constexpr,
                          EPS_INSIDE: tl.constexpr, EVEN: tl.constexpr, HINT: tl.constexpr, BLOCK_: tl.constexpr):
        b = tl.program_id(0) + first
        t = tl.load(blk_tensor + b)
        off = tl.load(blk_offset + b)
        idx = tl.arange(0, BLOCK_)
        mask = idx < tl.load(blk_length + b)
        wp = _at(w_tab, t, off, DT, EVEN, HINT)
        gp = _at(g_tab, t, off, DT, EVEN, HINT)
        mp = _at(m_tab, t, off, DT, EVEN, HINT)
        vp = _at(v_tab, t, off, DT, EVEN, HINT)
        w = _ld(wp, idx, mask, EVEN)
        g = _ld(gp, idx, mask, EVEN)
        m = _ld(mp, idx, mask, EVEN)
        v = _ld(vp, idx, mask, EVEN)
        if HAS_GSCALE:
            g = g * tl.load(gscale_ptr)
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        u = _lamb_direction(m, v, w, inv_bc1, inv_bc2, eps, wd, EPS_INSIDE)
        if not EVEN:
            u = tl.where(mask, u, 0.0)
        _st(mp, idx, m, mask, DT, EVEN)
        _st(vp, idx, v, mask, DT, EVEN)
        if STORE_U:
            _st(gp, idx, u, mask, DT, EVEN)
        tl.store(sums + b, tl.sum(w * w, axis=0))
        tl.store(sums + nblk + b, tl.sum(u * u, axis=0))

    @triton.jit
    def lamb_pass2_kernel(w_tab, u_tab, m_tab, v_tab, blk_tensor, blk_offset, blk_length, blk_key, first,
                          scale_ptr, inv_bc1, inv_bc2, eps, wd,
                          DT: tl.constexpr, RECOMPUTE: tl.constexpr, EPS_INSIDE: tl.constexpr,
                          EVEN: tl.constexpr, HINT: tl.constexpr, BLOCK_: tl.constexpr):
        b = tl.program_id(0) + first
        t = tl.load(blk_tensor + b)
        off = tl.load(blk_offset + b)
        s = tl.load(scale_ptr + tl.load(blk_key + b))
        idx = tl.arange(0, BLOCK_)
        mask = idx < tl.load(blk_length + b)
        wp = _at(w_tab, t, off, DT, EVEN, HINT)
        w = _ld(wp, idx, mask, EVEN)
        if RECOMPUTE:
            m = _ld(_at(m_tab, t, off, DT, EVEN, HINT), idx, mask, EVEN)
            v = _ld(_at(v_tab, t, off, DT, EVEN, HINT), idx, mask, EVEN)
            u = _lamb_direction(m, v, w, inv_bc1, inv_bc2, eps, wd, EPS_INSIDE)
        else:
            u = _ld(_at(u_tab, t, off, DT, EVEN, HINT), idx, mask, EVEN)
        _st(wp, idx, w + s * u, mask, DT, EVEN)

    @triton.jit
    def sumsq2_kernel(a_tab, c_tab, blk_tensor, blk_offset, blk_length, sums, nblk, first,
                      DT: tl.constexpr, EVEN: tl.constexpr, HINT: tl.constexpr, BLOCK_: tl.constexpr):
        b = tl.program_id(0) + first
        t = tl.load(blk_tensor + b)
        off = tl.load(blk_offset + b)
        idx = tl.arange(0, BLOCK_)
        mask = idx < tl.load(blk_length + b)
        a = _ld(_at(a_tab, t, off, DT, EVEN, HINT), idx, mask, EVEN)
        c = _ld(_at(c_tab, t, off, DT, EVEN, HINT), idx, mask, EVEN)
        tl.store(sums + b, tl.sum(a * a, axis=0))
        tl.store(sums + nblk + b, tl.sum(c * c, axis=0))

    @triton.jit
    def lars_apply_kernel(w_tab, g_tab, buf_tab, blk_tensor, blk_offset, blk_length, blk_key, first, rate_ptr,
                          momentum, wd, lr, DT: tl.constexpr, EVEN: tl.constexpr, HINT: tl.constexpr,
                          BLOCK_: tl.constexpr):
        b = tl.program_id(0) + first
        t = tl.load(blk_tensor + b)
        off = tl.load(blk_offset + b)
        rate = tl.load(rate_ptr + tl.load(blk_key + b))
        idx = tl.arange(0, BLOCK_)
        mask = idx < tl.load(blk_length + b)
        wp = _at(w_tab, t, off, DT, EVEN, HINT)
        bp = _at(buf_tab, t, off, DT, EVEN, HINT)
        w = _ld(wp, idx, mask, EVEN)
        g = _ld(_at(g_tab, t, off, DT, EVEN, HINT), idx, mask, EVEN)
        buf = _ld(bp, idx, mask, EVEN)
        buf = momentum * buf + (g + wd * w) * rate
        _st(bp, idx, buf, mask, DT, EVEN)
        _st(wp, idx, w - lr * buf, mask, DT, EVEN)

    _KERNELS[:] = [lamb_pass1_kernel, lamb_pass2_kernel, sumsq2_kernel, lars_apply_kernel]


# ---------------------------------------------------------------------------------------------
# launchers: same signatures and results as the C and foreach passes
# ---------------------------------------------------------------------------------------------

class PartialLaunchError(RuntimeError):
    """A kernel failed after an earlier launch of the same pass had run: part of the tensors are
    updated, so redoing the pass with another implementation would apply it twice. Not a case
    for the fallback: the step is lost, and the run must stop."""


def _launch_all(launches, launch) -> None:
    """Run ``launch(grid, first, even)`` for each launch of a plan; a failure after the first
    launch is a :class:`PartialLaunchError` (the first one failing leaves everything untouched)."""
    for i, (grid, first, even) in enumerate(launches):
        try:
            launch(grid, first, even)
        except Exception as exc:  # noqa: BLE001
            if i == 0:
                raise
            raise PartialLaunchError(f"Triton kernel failed after part of the pass ran ({type(exc).__name__}: "
                                     f"{exc}); the optimizer state is inconsistent") from exc


def _tables(plan: Plan, *lists):
    """Address tables of the tensor lists, and whether all of them are 16-byte aligned."""
    entries = [plan.table_aligned(x) for x in lists]
    return [e[0] for e in entries], all(e[1] for e in entries)


def lamb_pass1(b, ws, gs, ms, vs, hp: dict, gscale: Optional[torch.Tensor], scratch):
    """Moments updated, u stored into ``scratch`` (the gradients) when given; returns
    ((sums [2, nblk] float32, keys), pass-2 input)."""
    dtype = ws[0].dtype
    plan = plan_of(b)
    _check(ws + ms + vs, dtype, plan)
    _check(gs, dtype)
    sums = torch.empty(2, plan.nblk, dtype=torch.float32, device=ws[0].device)
    (w_t, g_t, m_t, v_t), aligned = _tables(plan, ws, gs, ms, vs)
    gs_arg = gscale.to(torch.float32).reshape(1) if gscale is not None else sums
    _launch_all(plan.launches(), lambda grid, first, even: lamb_pass1_kernel[(grid,)](
        w_t, g_t, m_t, v_t, plan.tensor, plan.offset, plan.length, sums, plan.nblk, first, gs_arg,
        hp["beta1"], hp["beta2"], 1.0 - hp["beta1"], 1.0 - hp["beta2"], hp["inv_bc1"], hp["inv_bc2"], hp["eps"],
        hp["wd"], DT=_DTYPES[dtype], HAS_GSCALE=gscale is not None, STORE_U=scratch is not None,
        EPS_INSIDE=bool(hp["eps_inside"]), EVEN=even, HINT=even and aligned and HINTS, BLOCK_=BLOCK,
        num_warps=NUM_WARPS))
    return (sums, plan.key), (hp, scratch)


def lamb_pass2(b, ws, ms, vs, pass1_out, scaled: torch.Tensor) -> None:
    """w += scaled[key] * u, u read from the gradients or recomputed from m, v, w."""
    hp, us = pass1_out
    plan = plan_of(b)
    (w_t, m_t, v_t, u_t), aligned = _tables(plan, ws, ms, vs, us if us is not None else ws)
    scale = scaled.to(ws[0].device, torch.float32)
    _launch_all(plan.launches(), lambda grid, first, even: lamb_pass2_kernel[(grid,)](
        w_t, u_t, m_t, v_t, plan.tensor, plan.offset, plan.length, plan.key, first, scale, hp["inv_bc1"],
        hp["inv_bc2"], hp["eps"], hp["wd"], DT=_DTYPES[ws[0].dtype], RECOMPUTE=us is None,
        EPS_INSIDE=bool(hp["eps_inside"]), EVEN=even, HINT=even and aligned and HINTS, BLOCK_=BLOCK,
        num_warps=NUM_WARPS))


def sumsq2(b, xs, ys):
    """Per-block float32 sums of squares of two tensor lists: ((sums [2, nblk], keys))."""
    dtype = xs[0].dtype
    plan = plan_of(b)
    _check(xs, dtype, plan)
    _check(ys, dtype)
    sums = torch.empty(2, plan.nblk, dtype=torch.float32, device=xs[0].device)
    (x_t, y_t), aligned = _tables(plan, xs, ys)
    for grid, first, even in plan.launches():  # reads only: a failure part way leaves nothing changed
        sumsq2_kernel[(grid,)](x_t, y_t, plan.tensor, plan.offset, plan.length, sums, plan.nblk, first,
                               DT=_DTYPES[dtype], EVEN=even, HINT=even and aligned and HINTS, BLOCK_=BLOCK,
                               num_warps=NUM_WARPS)
    return sums, plan.key


def lars_apply(b, ws, gs, bufs, rate: torch.Tensor, momentum: float, wd: float, lr: float) -> None:
    plan = plan_of(b)
    _check(ws + bufs, ws[0].dtype, plan)
    _check(gs, ws[0].dtype)
    (w_t, g_t, b_t), aligned = _tables(plan, ws, gs, bufs)
    rate = rate.to(ws[0].device, torch.float32)
    _launch_all(plan.launches(), lambda grid, first, even: lars_apply_kernel[(grid,)](
        w_t, g_t, b_t, plan.tensor, plan.offset, plan.length, plan.key, first, rate, momentum, wd, lr,
        DT=_DTYPES[ws[0].dtype], EVEN=even, HINT=even and aligned and HINTS, BLOCK_=BLOCK, num_warps=NUM_WARPS))
