"""The non-finite guard has no gaps (pretrain/steps.py): a NaN gradient under a finite loss stops an
fp32 run without ZeRO (where DeepSpeed computes no gradient norm) before its checkpoint is written;
every precision asks DeepSpeed whether a step was applied; DeepSpeed's bare exception at the minimum
fp16 loss scale becomes the named exit 3. fp16 is refused on the CPU, so its engine is a stand-in."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.steps import StepAccountant, TrainingDiverged
from tests.pretrain_helpers import env, free_port

ROOT = Path(__file__).resolve().parents[1]


class StandIn:
    """What StepAccountant asks of DeepSpeed's engine; ``step`` does what it is told."""

    def __init__(self, fp16=False, bf16=False, step=None, applied=True):
        self.fp16, self.bf16, self._step, self.applied = fp16, bf16, step, applied
        self.optimizer = SimpleNamespace(cur_scale=1.0)

    def fp16_enabled(self):
        return self.fp16

    def bfloat16_enabled(self):
        return self.bf16

    def zero_optimization(self):
        return True

    def step(self):
        if self._step is not None:
            self._step()

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return torch.tensor(1.0)


def test_deepspeeds_exception_at_the_minimum_fp16_loss_scale_becomes_a_named_stop():
    def at_minimum():  # what DeepSpeed 0.19's DynamicLossScaler.update_scale raises
        raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")

    acct = StepAccountant(StandIn(fp16=True, step=at_minimum), torch.device("cpu"), lag=0, min_loss_scale=1)
    with pytest.raises(TrainingDiverged, match=r"^fp16 gradients overflow at the minimum loss scale 1: the loss "
                                               r"scale cannot fall further"):
        acct.optimizer_step(boundary=True)

    def other():
        raise RuntimeError("CUDA error: an illegal memory access")

    with pytest.raises(RuntimeError, match="illegal memory"):  # anything else is not dressed up
        StepAccountant(StandIn(fp16=True, step=other), torch.device("cpu"), lag=0).optimizer_step(boundary=True)


def test_a_step_deepspeed_skipped_under_bf16_is_not_counted():
    engine = StandIn(bf16=True, applied=False)  # bf16.check_grad_overflow on: DeepSpeed skipped it
    acct = StepAccountant(engine, torch.device("cpu"), lag=0)
    assert acct.end_step(stop_requested=False).applied is False
    assert acct.skipped_total == 1 and acct.interval_steps == 0


ARGS = ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--max-steps", "4",
        "--train-batch-size", "8", "--micro-batch-size", "4", "--set", "pretrain.log_every=1",
        "--set", "pretrain.checkpoint_every=1", "--set", "pretrain.num_workers=0", "--set", "pretrain.eval_samples=8",
        "--set", "zero_optimization.stage=0", "--set", "bf16.enabled=false", "--set", "fp16.enabled=false"]


@pytest.mark.slow
def test_a_nan_gradient_under_a_finite_loss_stops_fp32_without_zero_before_its_checkpoint(pretrain_work):
    # Backward pass 3 is step 2's first micro-batch (2 per step): its gradients hold one NaN.
    proc = subprocess.run([sys.executable, str(ROOT / "tests/nan_gradient_run.py"), "3", *ARGS, "--output", "nan_fp32"],
                          cwd=pretrain_work, env=dict(env(), MASTER_PORT=str(free_port())), capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-3000:]
    assert "fp32" in text.split("pretrain: ", 2)[1]  # the run really was fp32 (the start line)
    assert "non-finite gradient norm (inf or NaN in the gradients, the loss finite)" in text, text[-3000:]
    assert "Last checkpoint: step0000001" in text and "Traceback" not in text
    ckpt = pretrain_work / "nan_fp32" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000001"]  # step 2's weights never saved
