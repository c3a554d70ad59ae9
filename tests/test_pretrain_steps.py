"""Step accounting of the training loop (pretrain/steps.py) driven by a stand-in engine that
reports what DeepSpeed's would: fp16 steps skipped by the loss scaler, the loss scale, losses."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pretrain.steps import StepAccountant, TrainingDiverged


class StandInEngine:
    """fp16 engine whose loss scaler skips the steps listed in ``skips`` (0-based), halving the
    scale each time, as DeepSpeed's dynamic scaler does."""

    def __init__(self, fp16: bool, skips=(), scale: float = 2.0 ** 16):
        self.fp16 = fp16
        self.skips = set(skips)
        self.calls = 0
        self.optimizer = SimpleNamespace(cur_scale=scale)
        self._applied = True

    def fp16_enabled(self):
        return self.fp16

    def step(self):
        self._applied = self.calls not in self.skips
        if not self._applied:
            self.optimizer.cur_scale /= 2
        self.calls += 1

    def was_step_applied(self):
        return self._applied


def output(loss: float, correct: int = 3, count: int = 5, nsp_loss: float = 0.5):
    t = lambda x: torch.tensor(x)  # noqa: E731
    return SimpleNamespace(loss=t(loss), mlm_loss=t(loss - nsp_loss), nsp_loss=t(nsp_loss), mlm_correct=t(correct),
                           mlm_count=t(count), nsp_correct=t(1), nsp_count=t(2))


BATCH = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), "input_ids": torch.zeros(2, 4),
         "masked_lm_labels": torch.full((2, 3), -1)}


def run_steps(acct, engine, losses_per_step, stop_at=None):
    outcomes = []
    for i, losses in enumerate(losses_per_step):
        for loss in losses:
            acct.micro_batch(output(loss), BATCH)
        engine.step()
        outcomes.append(acct.end_step(stop_requested=stop_at is not None and i >= stop_at))
    return outcomes


def test_skipped_fp16_steps_do_not_count_and_are_reported():
    engine = StandInEngine(fp16=True, skips={0, 1, 3})
    acct = StepAccountant(engine, torch.device("cpu"), lag=0, max_consecutive_skips=5)
    out = run_steps(acct, engine, [[float("inf"), 9.0], [7.0, float("nan")], [4.0, 6.0], [1e9, 1.0], [2.0, 4.0]])
    assert [o.applied for o in out] == [False, False, True, False, True]
    assert acct.skipped_total == 3 and acct.consecutive_skips == 0
    assert acct.loss_scale() == 2.0 ** 16 / 8
    iv = acct.take_interval()
    # only the applied steps' micro-batches enter the loss and accuracies; a non-finite fp16 loss
    # is the scaler's business, not a reason to stop
    assert iv["steps"] == 2 and iv["micro_batches"] == 4
    assert iv["loss_sum"] == pytest.approx(4.0 + 6.0 + 2.0 + 4.0)
    assert iv["mlm_correct"] == 12 and iv["mlm_count"] == 20
    # the MLM loss summed per masked token (5 per micro-batch), the NSP loss per sample (2)
    assert iv["mlm_loss_sum"] == pytest.approx(5 * (3.5 + 5.5 + 1.5 + 3.5))
    assert iv["nsp_loss_sum"] == pytest.approx(4 * 2 * 0.5)
    # throughput counts all the work: 10 micro-batches of 2 samples, 5 real tokens each
    assert iv["samples"] == 20 and iv["tokens"] == 50
    # and what the FLOP counts need: each real token attends over its row of 4, 5 masked tokens
    # (the model's count) of 6 slots per micro-batch; executed: every position, attention over
    # every row, every slot
    assert iv["pairs"] == 50 * 4 and iv["masked"] == 10 * 5
    assert iv["positions"] == 10 * 8 and iv["pairs_executed"] == 10 * 2 * 4 * 4 and iv["masked_slots"] == 10 * 6


def test_fp16_consecutive_skips_stop_the_run():
    engine = StandInEngine(fp16=True, skips=range(100))
    acct = StepAccountant(engine, torch.device("cpu"), lag=0, max_consecutive_skips=4, min_loss_scale=1e-9)
    with pytest.raises(TrainingDiverged, match=r"4 consecutive steps skipped by the fp16 loss scaler \(loss scale now 4096"):
        run_steps(acct, engine, [[1.0]] * 10)
    assert engine.calls == 4


def test_fp16_skips_at_the_minimum_scale_stop_the_run():
    engine = StandInEngine(fp16=True, skips=range(100), scale=4.0)
    acct = StepAccountant(engine, torch.device("cpu"), lag=0, max_consecutive_skips=50, min_loss_scale=1.0)
    with pytest.raises(TrainingDiverged, match="overflow at the minimum loss scale 1"):
        run_steps(acct, engine, [[1.0]] * 10)
    assert engine.optimizer.cur_scale <= 1.0


@pytest.mark.parametrize("lag", [0, 1])
def test_bf16_non_finite_loss_in_any_micro_batch_stops(lag):
    engine = StandInEngine(fp16=False)
    acct = StepAccountant(engine, torch.device("cpu"), lag=lag)
    run_steps(acct, engine, [[3.0, 2.0]])
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        # the first micro-batch of the second step, not the last, is bad
        run_steps(acct, engine, [[float("nan"), 2.0], [1.0, 1.0], [1.0, 1.0]])
    assert engine.calls == 2 + lag  # noticed lag steps later


class NormReportingEngine(StandInEngine):
    """bf16/fp32 engine that reports a global gradient norm per step, as DeepSpeed's
    ``get_global_grad_norm`` does: a tensor (ZeRO), a float, or None (not computed)."""

    def __init__(self, norms):
        super().__init__(fp16=False)
        self.norms = list(norms)

    def get_global_grad_norm(self):
        return self.norms[self.calls - 1]


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("kind", ["tensor", "float"])
def test_bf16_non_finite_gradient_norm_stops_although_the_loss_is_finite(lag, kind):
    wrap = (lambda x: torch.tensor(x)) if kind == "tensor" else float
    engine = NormReportingEngine([wrap(1.5), None, wrap(float("inf")), wrap(2.0), wrap(2.0), wrap(2.0)])
    acct = StepAccountant(engine, torch.device("cpu"), lag=lag)
    run_steps(acct, engine, [[3.0], [3.0]])  # a finite norm, then none computed: both fine
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient norm \(inf or NaN in the gradients, the loss finite\)"):
        run_steps(acct, engine, [[2.0], [2.0], [2.0], [2.0]])
    assert engine.calls == 3 + lag


def test_a_checkpoint_flush_sees_the_non_finite_gradient_norm_of_the_step_just_done():
    # run.py reads every flag before it saves: the step that made the weights NaN is caught
    # before its checkpoint is written, also with the flags read one step late.
    engine = NormReportingEngine([torch.tensor(1.0), torch.tensor(float("nan"))])
    acct = StepAccountant(engine, torch.device("cpu"), lag=1)
    run_steps(acct, engine, [[3.0], [3.0]])
    with pytest.raises(TrainingDiverged, match="gradient norm"):
        acct.flush()


def test_a_stop_request_lands_lag_steps_later_and_flush_reads_the_rest():
    engine = StandInEngine(fp16=False)
    acct = StepAccountant(engine, torch.device("cpu"), lag=1)
    out = run_steps(acct, engine, [[1.0]] * 4, stop_at=2)
    assert [o.stop for o in out] == [False, False, False, True]
    acct2 = StepAccountant(engine, torch.device("cpu"), lag=1)
    out = run_steps(acct2, engine, [[1.0]] * 3, stop_at=2)
    assert not any(o.stop for o in out) and acct2.flush() is True


def test_flags_go_through_one_collective_per_step():
    engine = StandInEngine(fp16=False)
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        t[0] = 1.0  # another rank asked to stop

    acct = StepAccountant(engine, torch.device("cpu"), lag=0, all_reduce=all_reduce)
    out = run_steps(acct, engine, [[1.0, 2.0]])
    assert len(calls) == 1 and calls[0].tolist() == [0.0, 0.0, 0.0]
    assert out[0].stop is True
    assert not math.isnan(acct.take_interval()["loss_sum"])
