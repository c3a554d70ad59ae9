"""Step accounting: what each optimizer step did, whether the run must stop, and the interval
statistics, without the host waiting for the GPU between logging steps.

* Per micro-batch the loss, accuracy counts and the work done (real tokens, the positions they
  attend over, real masked positions: what ``mfu`` counts, ``pretrain/flops.py``) are added on the
  device; what the shapes tell (samples, positions: what ``hfu`` counts) is counted on the host.
* Per step one small collective goes out: the MAX over ranks of [stop requested, non-finite loss
  seen, non-finite gradient norm seen]. Its result is copied to host memory behind an event and read ``lag`` steps later (1 on
  accelerators: by then the GPU has finished it and the host never waits for the step it has just
  queued; 0 on the CPU, where everything is synchronous anyway). A stop therefore lands ``lag``
  steps after the request, on every rank at the same step.
* Between the micro-batches of a step the same collective goes out with only the stop flag set
  (:meth:`StepAccountant.stop_between_micro_batches`), read ``lag`` micro-batches later: a stop
  requested mid-step is agreed within ``lag + 1`` micro-batches, not at the end of a step that can
  take longer than a launcher's grace period; the caller drops the partial step
  (:meth:`StepAccountant.drop_partial_step`) and saves the last complete one.
* fp16: DeepSpeed's dynamic loss scaler skips a step whose gradients overflowed (it has already
  synchronised to decide). A skipped step is no step: the step counter, the schedule and the
  statistics only count applied ones; skipped steps are counted and logged with the loss scale;
  ``max_consecutive_skips`` in a row, or two in a row at the minimum scale, stops the run
  (:class:`TrainingDiverged`). Non-finite losses are the scaler's business under fp16.
* fp16 at the minimum loss scale: DeepSpeed's scaler raises a bare ``Exception`` from
  ``engine.step()``; :meth:`StepAccountant.optimizer_step` turns it into :class:`TrainingDiverged`.
* Every precision asks ``engine.was_step_applied()`` (a plain bool DeepSpeed sets at each step):
  with ``bf16.check_grad_overflow`` on, DeepSpeed's bf16 optimizer skips a step too.
* fp32/bf16: a non-finite loss in any micro-batch, or a non-finite global gradient norm (the one
  DeepSpeed's ZeRO and bf16 optimizers compute at every step, read as a device tensor: no wait; for
  fp32 without ZeRO, where DeepSpeed computes none, one fused norm over the reduced gradients just
  before ``engine.step()``, also left on the device), stops the run. The shipped
  configs turn off DeepSpeed's own bf16 gradient scan (``bf16.check_grad_overflow``: a max, a min
  and an isfinite per gradient tensor, ~4,800 small kernels and a host sync per BERT-Large step:
  ZeRO-1 ran at 880 samples/s with it, 1,103 without, on an H100); this check keeps what it
  guarded: no run goes on, and no checkpoint is written, after a step whose gradients held inf or
  NaN (DeepSpeed's scan would have skipped that step; here the run stops, exit 3).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from pretrain.flops import batch_work

# Interval sums. The MLM loss is summed per masked token and the NSP loss per sample, so their
# means over an interval (and over ranks) weigh every prediction alike, as the held-out ones do.
STATS = ("loss_sum", "micro_batches", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count",
         "mlm_loss_sum", "nsp_loss_sum")
# Work done, skipped steps included (throughput, FLOPs): on the device (real tokens, sum over them
# of the positions each attends over, real masked positions) and on the host (from the shapes).
WORK = ("tokens", "pairs", "masked")
EXECUTED = ("samples", "positions", "pairs_executed", "masked_slots")


class TrainingDiverged(RuntimeError):
    """The run cannot go on: a non-finite loss or gradient norm, or an fp16 loss scale that keeps
    overflowing."""


@dataclass
class StepOutcome:
    applied: bool   # this step changed the weights (False: skipped by the fp16 loss scaler)
    stop: bool      # a stop was requested (agreed by all ranks): save and exit after this step


class StepAccountant:
    def __init__(self, engine, device: torch.device, *, lag: int, max_consecutive_skips: int = 50,
                 min_loss_scale: Optional[float] = None, all_reduce=None) -> None:
        self.engine = engine
        self.device = device
        self.fp16 = bool(engine.fp16_enabled())
        # fp32 without ZeRO: no DeepSpeed optimizer wrapper, so no global gradient norm; computed here
        self.own_norm = not any(getattr(engine, f, lambda: False)()
                                for f in ("fp16_enabled", "bfloat16_enabled", "zero_optimization"))
        self._grads_bad: Optional[torch.Tensor] = None
        self.lag = lag
        self.max_consecutive_skips = max_consecutive_skips
        self.min_loss_scale = min_loss_scale
        self._all_reduce = all_reduce
        self.step_stats = torch.zeros(len(STATS), dtype=torch.float64, device=device)
        self.interval = torch.zeros_like(self.step_stats)
        self.work = torch.zeros(len(WORK), dtype=torch.float64, device=device)
        self.executed = dict.fromkeys(EXECUTED, 0)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # losses of this step
        self.bad_norm = torch.zeros((), dtype=torch.float64, device=device)   # its gradient norm
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.interval_steps = 0
        self._pending: deque = deque()
        self._micro_pending: deque = deque()  # stop flags between micro-batches
        # Constants made once: a tensor built from a Python number on a GPU is a blocking copy.
        self._one = torch.ones((), dtype=torch.float64, device=device)
        self._zero = torch.zeros((), dtype=torch.float64, device=device)
        avoid_deepspeed_host_syncs()

    # -- per micro-batch ------------------------------------------------------------------------
    def micro_batch(self, out, batch: dict) -> None:
        loss = out.loss.detach().double()
        self.step_stats += torch.stack([
            loss, self._one, out.mlm_correct.double(), out.mlm_count.double(), out.nsp_correct.double(),
            out.nsp_count.double(), out.mlm_loss.detach().double() * out.mlm_count,
            out.nsp_loss.detach().double() * out.nsp_count])
        work, executed = batch_work(batch, out.mlm_count)
        self.work += work
        for key, n in executed.items():
            self.executed[key] += n
        if not self.fp16:
            self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(loss)).double())  # a new tensor

    def optimizer_step(self, boundary: bool) -> None:
        """``engine.step()`` after a micro-batch's backward (``boundary``: the step's last one).
        DeepSpeed's fp16 scaler ends a run at its minimum scale with a bare ``Exception``; that
        becomes :class:`TrainingDiverged` (exit 3, a named message, no traceback)."""
        if boundary and self.own_norm:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads:  # the gradients as the optimizer will apply them (reduced over ranks)
                norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False, foreach=True)
                self._grads_bad = (~torch.isfinite(norm)).to(self.bad_norm.device, torch.float64)
        try:
            self.engine.step()
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises Exception itself
            if "loss scale already at minimum" not in str(exc):
                raise
            floor = "" if self.min_loss_scale is None else f" {self.min_loss_scale:g}"
            raise TrainingDiverged(f"fp16 gradients overflow at the minimum loss scale{floor}: the loss scale "
                                   "cannot fall further. Lower the learning rate, or train in bf16") from None

    def stop_between_micro_batches(self, requested: bool) -> bool:
        """After a micro-batch that is not a step's last: True once every rank has agreed to stop
        (a request anywhere, ``lag`` micro-batches ago). The flags collective, with only its stop
        flag set."""
        flags = torch.stack([self._one if requested else self._zero, self._zero, self._zero])
        if self._all_reduce is not None:
            self._all_reduce(flags)
        self._micro_pending.append(_to_host(flags))
        stop = False
        while len(self._micro_pending) > self.lag:
            stop |= self._read(self._micro_pending.popleft())
        return stop

    def drop_partial_step(self) -> None:
        """Forget what the micro-batches of an unfinished step added (the step is not taken)."""
        self.step_stats.zero_()
        self.nonfinite = self._zero
        self._grads_bad = None

    # -- per optimizer step -----------------------------------------------------------------------
    def end_step(self, stop_requested: bool) -> StepOutcome:
        # False: DeepSpeed skipped the step (fp16 overflow; bf16 with its own gradient scan on)
        applied = bool(self.engine.was_step_applied())
        if not self.fp16:
            self._check_grad_norm()
        if applied:
            self.interval += self.step_stats
            self.interval_steps += 1
            self.consecutive_skips = 0
        else:
            self.skipped_total += 1
            self.consecutive_skips += 1
            self._check_loss_scale()
        self.step_stats.zero_()
        flags = torch.stack([self._one if stop_requested else self._zero, self.nonfinite, self.bad_norm])
        self.nonfinite = self.bad_norm = self._zero
        if self._all_reduce is not None:
            self._all_reduce(flags)
        self._pending.append(_to_host(flags))
        stop = False
        while len(self._pending) > self.lag:
            stop |= self._read(self._pending.popleft())
        return StepOutcome(applied=applied, stop=stop)

    def _check_grad_norm(self) -> None:
        """Flag the step's global gradient norm if it is not finite (None: not computed)."""
        get = getattr(self.engine, "get_global_grad_norm", None)
        norm = get() if get is not None else None
        if norm is None:
            if self._grads_bad is not None:  # fp32 without ZeRO: the norm optimizer_step computed
                self.bad_norm, self._grads_bad = self._grads_bad, None
            return
        if torch.is_tensor(norm) and norm.device.type == self.bad_norm.device.type:
            self.bad_norm = (~torch.isfinite(norm.detach())).any().to(self.bad_norm.device, torch.float64)
        else:  # a float, or a host tensor (ZeRO-Offload, already synchronised): no device copy
            self.bad_norm = self._zero if math.isfinite(float(norm)) else self._one

    def flush(self) -> bool:
        """Read every flag still in flight (end of the run); True if a stop was requested."""
        stop = False
        while self._pending:
            stop |= self._read(self._pending.popleft())
        return stop

    def _read(self, pending) -> bool:
        host, event = pending
        if event is not None:
            event.synchronize()
        stop, bad_loss, bad_norm = host.tolist()
        if bad_loss > 0:
            raise TrainingDiverged("non-finite loss. Lower the learning rate or lengthen warmup")
        if bad_norm > 0:
            raise TrainingDiverged("non-finite gradient norm (inf or NaN in the gradients, the loss finite). "
                                   "Lower the learning rate or lengthen warmup")
        return stop > 0

    def _check_loss_scale(self) -> None:
        scale = self.loss_scale()
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDiverged(f"{self.consecutive_skips} consecutive steps skipped by the fp16 loss scaler "
                                   f"(loss scale now {scale:g}): the gradients overflow at every scale. Lower the "
                                   "learning rate, or train in bf16")
        if scale is not None and self.min_loss_scale is not None and scale <= self.min_loss_scale \
                and self.consecutive_skips > 1:
            raise TrainingDiverged(f"fp16 gradients overflow at the minimum loss scale {self.min_loss_scale:g}: "
                                   "the loss scale cannot fall further. Lower the learning rate, or train in bf16")

    # -- what the log reads (a log step synchronises anyway) ----------------------------------------
    def loss_scale(self) -> Optional[float]:
        if not self.fp16:
            return None
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None)
        if scale is None:
            scale = getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
        return None if scale is None else float(scale)

    def take_interval(self, all_reduce=None) -> dict:
        """The interval's sums (over ranks with ``all_reduce``), then a fresh interval."""
        executed = torch.tensor([float(self.executed[k]) for k in EXECUTED], dtype=torch.float64)
        stats = torch.cat([self.interval, self.work, executed.to(self.work.device)])
        if all_reduce is not None:
            all_reduce(stats)
        values = dict(zip(STATS + WORK + EXECUTED, stats.tolist()))
        values["steps"] = self.interval_steps
        self.interval.zero_()
        self.work.zero_()
        self.executed = dict.fromkeys(EXECUTED, 0)
        self.interval_steps = 0
        return values


def _fill_nan_or_inf(input: torch.Tensor, device=None, val: float = -1.0) -> None:
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` (an inf or NaN gradient norm becomes its -1
    sentinel) with the value passed as a scalar. DeepSpeed 0.19 builds it as
    ``torch.tensor(-1.0, device=...)`` (whatever ``val`` says; every caller leaves it at -1): a
    blocking host-to-device copy at every ZeRO step that computes the gradient norm."""
    input.masked_fill_(input.isnan() | input.isinf(), val)


def avoid_deepspeed_host_syncs() -> None:
    """Use :func:`_fill_nan_or_inf` where DeepSpeed's ZeRO optimizers call the original (their
    modules look the name up at each call, so engines built before this call get it too)."""
    import importlib

    for name in ("deepspeed.runtime.utils", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # another DeepSpeed layout: nothing to replace
            continue
        if hasattr(module, "mask_nan_or_inf_with_val_inplace"):
            module.mask_nan_or_inf_with_val_inplace = _fill_nan_or_inf


def _to_host(flags: torch.Tensor):
    """(host copy, event to wait on) without waiting now."""
    if flags.device.type == "cpu":
        return flags.clone(), None
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = acc.Event()
    event.record()
    return host, event
