"""Shared machinery of the layer-wise optimizers (LAMB, LARS).

Both need, per model tensor, a norm that spans the whole tensor before any element can be
updated. A step therefore runs in two passes with one reduction between them:

1. pass 1 (``_partial_sums``): element-wise work plus sums of squares per *segment*;
2. the segment sums are added per model tensor, across data-parallel ranks when the tensors
   are ZeRO partitions (one collective for the whole param group, no host synchronisation);
3. pass 2 (``_apply``): the element-wise update scaled by each tensor's trust ratio.

Subclasses implement the two passes in several ways (``impl``), all computing the same math:
``"loop"`` (per-tensor reference), ``"foreach"`` (``torch._foreach_*``, grouped by device and
dtype), ``"fused"`` (the default: C/OpenMP kernels on the CPU, Triton kernels on GPUs) and
``"triton"`` (the Triton kernels wherever they run, CPU tensors through Triton's interpreter).
A fast path that cannot run, or fails at any call, hands the step to ``"foreach"`` with a
warning, for the rest of the run.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable, Optional

import numpy as np
import torch

from . import _comm, _native
from ._layout import FlatLayout, whole_tensor_layout

IMPLS = ("loop", "foreach", "fused", "triton")


class Bucket:
    """Tensors of one param group that share device and dtype, with their segment layouts.

    Buckets are cached across steps (same tensors, same layouts), so the index tensors and the
    native work plan are built once.
    """

    def __init__(self, params: list[torch.Tensor], layouts: list[FlatLayout]) -> None:
        self.params = params
        self.layouts = layouts
        self.seg_keys = [k for lay in layouts for k in lay.keys]
        self.partitioned = any(lay.partitioned for lay in layouts)
        self.process_group = next((lay.process_group for lay in layouts if lay.partitioned), None)
        self._keys_t: dict[torch.device, torch.Tensor] = {}
        self._plan: Optional[_native.BlockPlan] = None
        self.triton_plan = None  # optim._triton.Plan, built at the first Triton step
        self.scratch: Optional[list[torch.Tensor]] = None  # foreach LAMB's in-place u

    def seg_keys_tensor(self, device: torch.device) -> torch.Tensor:
        t = self._keys_t.get(device)
        if t is None:
            t = self._keys_t[device] = torch.tensor(self.seg_keys, dtype=torch.long, device=device)
        return t

    def segment_views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Segment views of ``tensors`` (shaped like ``self.params``), in segment order."""
        out: list[torch.Tensor] = []
        for t, lay in zip(tensors, self.layouts):
            if len(lay.keys) == 1 and lay.starts[0] == 0 and lay.lengths[0] == t.numel():
                out.append(t.view(-1))
            else:
                out.extend(lay.views(t))
        return out

    def block_plan(self) -> _native.BlockPlan:
        """Work split for the C kernels; ``plan.key`` maps each block to its model tensor."""
        if self._plan is None:
            seg_tensor = np.array([i for i, lay in enumerate(self.layouts) for _ in lay.keys], dtype=np.int64)
            seg_start = np.array([s for lay in self.layouts for s in lay.starts], dtype=np.int64)
            seg_len = np.array([n for lay in self.layouts for n in lay.lengths], dtype=np.int64)
            plan = _native.BlockPlan(seg_tensor, seg_start, seg_len)
            plan.key = self.seg_keys_tensor(torch.device("cpu")).index_select(0, plan.seg)
            self._plan = plan
        return self._plan


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base class: tracks which model tensor every stepped element belongs to."""

    def __init__(self, params, defaults: dict, impl: Optional[str]) -> None:
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} or None (fastest available), got {impl!r}")
        super().__init__(params, defaults)
        self.impl = impl
        self._names: list[str] = []
        self._layouts: dict[int, FlatLayout] = {}
        self._group_keys: dict[int, list[int]] = {}
        for group in self.param_groups:
            names = group.get("param_names")
            keys = []
            for i, p in enumerate(group["params"]):
                key = len(self._names)
                self._names.append(names[i] if names else f"param{key}")
                self._layouts[id(p)] = whole_tensor_layout(key, p.numel())
                keys.append(key)
            if group["params"]:
                self._group_keys[id(group["params"][0])] = keys
        self._num_keys = len(self._names)
        self._global_grad_norm_fn: Optional[Callable[[], object]] = None
        self._last_trust: dict[int, tuple[list[int], torch.Tensor]] = {}  # first tensor -> (keys, ratios)
        self._bucket_cache: dict[int, tuple] = {}
        self._warned: set[str] = set()
        self._failed: set[str] = set()  # fast paths that raised once: not tried again
        self._skip_steps_during_wrap = False  # set by optim.initialize around deepspeed.initialize

    # -- wiring by optim.zero for DeepSpeed's flattening wrappers ------------------------------
    def attach_layouts(self, layouts: dict[int, FlatLayout], names: list[str],
                       group_keys: dict[int, list[int]],
                       global_grad_norm_fn: Optional[Callable[[], object]] = None) -> None:
        """Replace the per-tensor layouts by flat ones (``layouts`` and ``group_keys``, the model
        tensors of each group on all ranks, keyed by ``id(flat)``)."""
        self._layouts = dict(layouts)
        self._names = list(names)
        self._num_keys = len(names)
        self._group_keys = dict(group_keys)
        self._global_grad_norm_fn = global_grad_norm_fn
        self._bucket_cache.clear()

    def _layout_of(self, p: torch.Tensor) -> FlatLayout:
        layout = self._layouts.get(id(p))
        if layout is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() got a tensor it was not built with (shape "
                f"{tuple(p.shape)}). DeepSpeed's ZeRO and mixed-precision optimizers replace the "
                "parameters by flat partitions, and a layer-wise trust ratio computed over a "
                "partition is wrong. Build the engine with optim.initialize(...) instead of "
                "deepspeed.initialize(...) so the per-tensor layout is known.")
        if layout.lengths and max(s + n for s, n in zip(layout.starts, layout.lengths)) > p.numel():
            raise RuntimeError(f"{type(self).__name__}: layout does not fit tensor of {p.numel()} elements")
        return layout

    # -- telemetry --------------------------------------------------------------------------
    def trust_ratios(self) -> dict[str, float]:
        """Per-tensor trust ratios (LARS: local learning rates) of the last step, by name."""
        out: dict[str, float] = {}
        for keys, ratios in self._last_trust.values():
            values = ratios.tolist()
            for k in keys:
                out[self._names[k]] = values[k]
        return out

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if self._skip_steps_during_wrap:
            # DeepSpeed's fp16/bf16 wrapper without ZeRO primes optimizer state with a step on
            # zero gradients while the engine is built. For LAMB that step is not harmless
            # (u = λw gives w ← w − lr·w), so it is skipped; state is created at the first real step.
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prepared = self._prepare_step()  # e.g. LAMB's global gradient norm, before any update
        for group in self.param_groups:
            buckets = self._buckets(group)
            if buckets:
                self._step_group(group, buckets, prepared)
        return loss

    def _prepare_step(self):
        return None

    def _step_group(self, group: dict, buckets: "list[Bucket]", prepared) -> None:
        raise NotImplementedError

    def _choose_impl(self, tensors: list[torch.Tensor]) -> str:
        impl = self.impl or "fused"
        if impl in ("loop", "foreach"):
            return impl
        device = tensors[0].device
        if impl == "fused" and device.type == "cpu":
            if _native.supports(tensors) and _native.library() is not None:
                return "fused"
            reason = _native.error() or "they need contiguous fp32 CPU tensors"
            self._warn_once("native", f"fused CPU kernels unavailable ({reason}); using foreach")
            return "foreach"
        if "triton" in self._failed:
            return "foreach"
        from . import _triton

        reason = _triton.unavailable_reason(device)
        if reason is None and tensors[0].dtype not in _triton.supported_dtypes():
            reason = f"no kernels for {tensors[0].dtype}"
        if reason is not None:
            self._warn_once("triton", f"Triton kernels unavailable ({reason}); using foreach")
            return "foreach"
        return "triton"

    def _fast_path_failed(self, key: str, exc: BaseException) -> None:
        """A fast path raised: the caller redoes the work with foreach, for the rest of the run."""
        self._failed.add(key)
        self._warn_once(f"{key}-failed", f"{key} kernels failed ({type(exc).__name__}: {str(exc)[:300]}); "
                                         "using foreach from now on")

    def _warn_once(self, key: str, msg: str) -> None:
        """A warning that shows whatever ``impl`` was asked for: the slow path is several times slower."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{type(self).__name__}: {msg}", RuntimeWarning, stacklevel=3)

    def _buckets(self, group: dict) -> list[Bucket]:
        with_grad = [p for p in group["params"] if p.grad is not None]
        sig = (tuple(map(id, with_grad)), tuple(map(torch.Tensor.data_ptr, with_grad)))  # C-level loops
        cached = self._bucket_cache.get(id(group))
        if cached is not None and cached[0] == sig:
            return cached[1]
        by_kind: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for p in with_grad:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            ps, lays = by_kind[(p.device, p.dtype)]
            ps.append(p)
            lays.append(self._layout_of(p))
        buckets = [Bucket(ps, lays) for ps, lays in by_kind.values()]
        self._bucket_cache[id(group)] = (sig, buckets)
        return buckets

    def _reduce(self, buckets: list[Bucket], sums_and_keys: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per-model-tensor totals ``[k, num_keys]`` (float64) from per-segment or per-block
        partial sums, added across the data-parallel group when the tensors are partitions."""
        device = sums_and_keys[0][0].device
        totals = torch.zeros(sums_and_keys[0][0].shape[0], self._num_keys, dtype=torch.float64, device=device)
        for sums, keys in sums_and_keys:
            totals.index_add_(1, keys.to(device), sums.to(device, torch.float64))
        partitioned = [b for b in buckets if b.partitioned]
        if partitioned:
            _comm.all_reduce_sum(totals, partitioned[0].process_group)  # NCCL gets no CPU tensor
        return totals

    def _remember(self, group: dict, ratios: torch.Tensor) -> None:
        """Keep this step's ratios (no copy, no host sync) for :meth:`trust_ratios`."""
        # Keyed by the group's first tensor: load_state_dict replaces the group dicts.
        first = id(group["params"][0])
        keys = self._group_keys.get(first)
        if keys is not None:
            self._last_trust[first] = (keys, ratios)
