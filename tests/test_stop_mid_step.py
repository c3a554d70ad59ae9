"""A stop requested mid-step is agreed between micro-batches (pretrain/steps.py), lag micro-batches
after the request on any rank, and the dropped partial step leaves nothing behind. The real run
(a SIGTERM early in a 32-micro-batch step) is in test_pretrain_signals.py."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pretrain.steps import StepAccountant


def engine():
    return SimpleNamespace(fp16_enabled=lambda: False, bfloat16_enabled=lambda: True, zero_optimization=lambda: True,
                           was_step_applied=lambda: True, get_global_grad_norm=lambda: None)


def test_a_request_on_another_rank_is_agreed_lag_micro_batches_later():
    calls = []

    def all_reduce(flags):  # MAX over ranks: another rank asks to stop from its 3rd micro-batch on
        calls.append(flags.clone())
        if len(calls) >= 3:
            flags[0] = 1.0

    for lag, want in ((0, [False, False, True, True]), (1, [False, False, False, True])):
        calls.clear()
        acct = StepAccountant(engine(), torch.device("cpu"), lag=lag, all_reduce=all_reduce)
        assert [acct.stop_between_micro_batches(False) for _ in range(4)] == want
        assert [c.tolist() for c in calls] == [[0.0, 0.0, 0.0]] * 4  # this rank asked nothing; one flags tensor each


def test_a_dropped_partial_step_leaves_no_statistics_or_flags():
    acct = StepAccountant(engine(), torch.device("cpu"), lag=0)
    t = torch.tensor
    out = SimpleNamespace(loss=t(float("nan")), mlm_loss=t(1.0), nsp_loss=t(0.5), mlm_correct=t(3), mlm_count=t(5),
                          nsp_correct=t(1), nsp_count=t(2))
    batch = {"attention_mask": t([[1, 1, 0]]), "input_ids": torch.zeros(1, 3), "masked_lm_labels": t([[-1, 4, -1]])}
    acct.micro_batch(out, batch)  # a non-finite loss in the unfinished step
    acct.drop_partial_step()
    assert acct.end_step(stop_requested=False).applied  # no TrainingDiverged: that step was never taken
    assert acct.take_interval()["micro_batches"] == 0


def test_a_run_says_when_a_stop_may_not_fit_in_the_launchers_grace(capsys):
    from pretrain.run import TrainingRun

    run = SimpleNamespace(step_s=40.0, accum=4, is_main=True)  # 10 s micro-batches
    TrainingRun.check_grace(run, save_s=12.0)  # 2 x 10 + 12 = 32 s
    assert capsys.readouterr().out.startswith("pretrain: a stop may take ~32 s (2 micro-batches of 10.0 s, a save "
                                              "of 12 s), more than the 30 s launchers wait after SIGTERM")
    TrainingRun.check_grace(SimpleNamespace(step_s=40.0, accum=8, is_main=True), save_s=12.0)  # 22 s: fits
    assert capsys.readouterr().out == ""
