"""LR schedules against their formulas, warmup given both ways, scaling rules, config errors."""
from __future__ import annotations

import pytest
import torch

from optim import schedules


def test_poly_decay_nvidia_shape():
    total, warm = 7038, schedules.resolve_warmup(7038, warmup_proportion=0.2843)
    assert warm == round(0.2843 * 7038)
    f = schedules.multiplier_fn("WarmupPolyDecay", {"total_num_steps": total, "warmup_proportion": 0.2843})
    for step in (0, 1, 100, warm - 2):
        assert f(step) == pytest.approx((step + 1) / warm)
    for step in (warm - 1, 3000, 7000, total - 1):
        assert f(step) == pytest.approx((1 - (step + 1) / total) ** 0.5)
    assert f(total + 10) == 0.0


def test_linear_decay_power_one_and_steps_warmup():
    f = schedules.multiplier_fn("WarmupPolyDecay", {"total_num_steps": 100, "warmup_num_steps": 10, "power": 1.0})
    assert f(4) == pytest.approx(0.5)
    assert f(49) == pytest.approx(0.5)


def test_constant_and_exp_schedules():
    c = schedules.multiplier_fn("WarmupConstant", {"warmup_num_steps": 4})
    assert [c(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    e = schedules.multiplier_fn("WarmupExpDecayExp", {"total_num_steps": 1000, "warmup_proportion": 0.02,
                                                      "decay_rate": 0.9, "decay_steps": 250})
    assert e(10) == pytest.approx((10 / 20) ** 2)
    assert e(20) == 1.0
    assert e(520) == pytest.approx(0.9 ** 2)


def test_scheduler_drives_optimizer_lr():
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    sched = schedules.build_scheduler(opt, "WarmupConstant", {"warmup_num_steps": 2})
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.25, 0.5, 0.5]


def test_lr_scaling_rules():
    assert schedules.scale_lr(1e-3, 512, 32768, "sqrt") == pytest.approx(1e-3 * 8)
    assert schedules.scale_lr(1e-3, 512, 32768, "linear") == pytest.approx(1e-3 * 64)
    assert schedules.scale_lr(1e-3, 512, 32768, "none") == 1e-3
    with pytest.raises(ValueError, match="unknown LR scaling rule 'cubic'"):
        schedules.scale_lr(1e-3, 512, 1024, "cubic")


@pytest.mark.parametrize("name,params,msg", [
    ("Cosine", {}, "unknown scheduler type 'Cosine'"),
    ("WarmupPolyDecay", {"total_num_steps": 10}, "exactly one of warmup_proportion and warmup_num_steps"),
    ("WarmupPolyDecay", {"total_num_steps": 10, "warmup_num_steps": 1, "warmup_steps": 3}, "unknown params.*warmup_steps"),
    ("WarmupExpDecayExp", {"total_num_steps": 10, "warmup_num_steps": 1, "decay_rate": 0.9}, "missing param 'decay_steps'"),
    ("WarmupConstant", {"warmup_proportion": 1.5}, r"warmup_proportion must be in \[0, 1\]"),
])
def test_schedule_config_errors(name, params, msg):
    with pytest.raises(ValueError, match=msg):
        schedules.multiplier_fn(name, params)
