"""No host synchronisation inside a training step: the real loop (``TrainingRun.train``) on a real
DeepSpeed engine (bert-tiny, LAMB, the precisions and ZeRO stages the shipped configs use), watched
by a dispatch mode that records every operation which, on an accelerator, makes the host wait for
it: reading a tensor's value (``.item()``, ``bool()``, ``float()``, ``int()``: ``aten._local_scalar_dense``;
``.tolist()``) and building a tensor from Python data (``torch.tensor(...)``: ``aten.lift_fresh``,
a blocking host-to-device copy from pageable memory; ``torch.scalar_tensor``).

Allowed: the logging, evaluation and checkpoint code, which synchronise by design, and the read of
the step flags' host copy (``StepAccountant._read``: made behind an event, read a step later on
accelerators). The first step is left out (one-time set-up: the optimizer's address tables). The
optimizer runs its multi-tensor path (``impl: foreach``, tensors only, as on a GPU without Triton):
its CPU kernels (``fused`` on CPUs) read their scalars from host memory, where there is no device
to wait for. On a GPU, bench/gpu_check.py's sync-debug stage checks the same with
``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ALLOWED_IN = {"log", "evaluate", "save", "_save", "flush", "_read"}  # TrainingRun / StepAccountant methods
V, SEQ, P, MICRO, ACCUM, STEPS = 500, 32, 5, 4, 2, 5


class SyncRecorder(TorchDispatchMode):
    """Records (what, completed steps, where) of every host-synchronising operation."""

    OPS = {torch.ops.aten._local_scalar_dense.default: "a tensor's value read (.item/bool/float/int)",
           torch.ops.aten.lift_fresh.default: "torch.tensor() of Python data"}

    def __init__(self, progress: dict) -> None:
        super().__init__()
        self.progress = progress
        self.events: list[tuple[str, int, list[str]]] = []

    def note(self, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if {f.name for f in stack} & ALLOWED_IN or "train" not in {f.name for f in stack}:
            return
        where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack
                 if not any(x in f.filename for x in ("torch/", "_pytest", "pluggy"))
                 and f.name not in ("note", "__torch_dispatch__", "__torch_function__")]
        self.events.append((what, self.progress["step"], where[-4:]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.note(self.OPS[func])
        return func(*args, **(kwargs or {}))


class PythonSideRecorder(TorchFunctionMode):
    """What the dispatcher does not see: ``.tolist()`` and ``torch.scalar_tensor`` called from Python."""

    def __init__(self, recorder: SyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.recorder.note(".tolist()")
        elif func is torch.scalar_tensor:
            self.recorder.note("torch.scalar_tensor()")
        return func(*args, **(kwargs or {}))


class Batches:
    """The data stream's interface over batches made in memory (the loader is not the step), padded
    or packed by pretrain/packing.py's Packer into rows of twice the sequence length."""

    epoch = 0

    def __init__(self, packed: bool = False) -> None:
        from pretrain.packing import Packer

        packer = Packer(seq_len=SEQ, pack_len=2 * SEQ, micro_batch=MICRO) if packed else None
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for k in range(4):
            ids = torch.randint(5, V, (MICRO, SEQ), generator=g)
            mask = torch.ones_like(ids)
            mask[:, SEQ - 3 - k:] = 0  # padding in every row
            ids *= mask
            batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask,
                     "masked_lm_positions": torch.randint(1, SEQ - 8, (MICRO, P), generator=g),
                     "masked_lm_labels": torch.randint(5, V, (MICRO, P), generator=g),
                     "next_sentence_label": torch.randint(0, 2, (MICRO,), generator=g)}
            self.batches.append(packer.pack(batch) if packer else batch)
        self.i = 0

    def next(self) -> dict:
        self.i += 1
        return self.batches[self.i % len(self.batches)]

    def take_wait(self) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {"consumed": self.i}


@pytest.fixture(scope="module")
def process_group():
    from pretrain.distributed import init_distributed

    init_distributed()


def record_steps(tmp_path, zero: int, bf16: bool, wrap_forward=None, packed: bool = False) -> list:
    """Train STEPS steps (a log at the last only, the noise scale measured at every other step)
    and return the host syncs recorded outside the allowed places, after the first step."""
    import optim
    from pretrain.config import PretrainConfig
    from pretrain.flops import FlopRates
    from pretrain.model import build_model
    from pretrain.run import TrainingRun

    model = build_model("bert-tiny", V, seed=0)
    if wrap_forward is not None:
        model.forward = wrap_forward(model.forward)
    ds = {"train_batch_size": MICRO * ACCUM, "train_micro_batch_size_per_gpu": MICRO,
          "gradient_accumulation_steps": ACCUM, "steps_per_print": 10 ** 9,
          "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "variant": "nvidia", "impl": "foreach"}},
          "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_proportion": 0.3, "total_num_steps": STEPS}},
          "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16, "check_grad_overflow": False}}
    engine, *_ = optim.initialize(model=model, config=ds)
    cfg = PretrainConfig(data="in-memory", output=str(tmp_path), max_steps=STEPS, log_every=STEPS, gns_every=2,
                         tensorboard=False)
    progress = {"step": 0, "samples": 0, "skipped": 0}
    run = TrainingRun(SimpleNamespace(stop_after=None), cfg, engine, Batches(packed), None, tmp_path, progress, {}, "{}",
                      glob=MICRO * ACCUM, micro=MICRO, accum=ACCUM, world=1, rank=0,
                      flop_rates=FlopRates.of(model.config), peak_flops=1e12, min_loss_scale=1)
    assert run.gns.enabled
    recorder = SyncRecorder(progress)
    with recorder, PythonSideRecorder(recorder):
        assert run.train(False) == 0
    assert progress["step"] == STEPS and run.gns.measurements == STEPS // 2  # measuring steps were watched too
    return [e for e in recorder.events if e[1] >= 1]


@pytest.mark.parametrize("zero,bf16,packed", [(2, True, False), (1, True, False), (0, False, False), (2, True, True)],
                         ids=["zero2-bf16", "zero1-bf16", "fp32", "zero2-bf16-packed"])
def test_no_host_sync_between_logging_steps(tmp_path, process_group, zero, bf16, packed):
    events = record_steps(tmp_path, zero, bf16, packed=packed)
    assert not events, "host syncs inside training steps:\n" + "\n".join(
        f"  step {step + 1}: {what} at {' <- '.join(reversed(where))}" for what, step, where in events)


def test_the_recorder_sees_what_model_py_used_to_do(tmp_path, process_group):
    """The control: a forward that builds a count with torch.tensor(n, device=...) and reads a
    loss with .item() (the two syncs of the model before) is caught, at each micro-batch."""

    def wrap(forward):
        def syncing_forward(**batch):
            out = forward(**batch)
            out.nsp_count = torch.tensor(out.nsp_count.numel() * MICRO, device=out.loss.device)
            out.loss.item()
            return out
        return syncing_forward

    events = record_steps(tmp_path, 2, True, wrap)
    whats = [what for what, _, where in events if any("syncing_forward" in w for w in where)]
    per_kind = (STEPS - 1) * ACCUM
    assert whats.count("torch.tensor() of Python data") == per_kind
    assert whats.count("a tensor's value read (.item/bool/float/int)") == per_kind
