"""LAMB and LARS against independent NumPy transcriptions of their formulas, the three code
paths against each other, and the package's helpers (registry, schedules, param groups)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import optim
from optim import Lamb, Lars

SHAPES = [(7, 5), (5,), (3, 4, 2), (11,)]


def problem(seed: int, steps: int, dtype=torch.float64):
    """Weights and a gradient sequence; tensors 0, 2 decay (0.01), tensors 1, 3 do not."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) * 0.1 for s in SHAPES] for _ in range(steps)]
    return ws, grads


def groups_of(ws, wd=0.01):
    return [{"params": [ws[0], ws[2]], "weight_decay": wd}, {"params": [ws[1], ws[3]], "weight_decay": 0.0}]


def run_torch(cls, ws, grads, **kw):
    ws = [w.clone() for w in ws]
    opt = cls(groups_of(ws, kw.pop("wd", 0.01)), **kw)
    for step_grads in grads:
        for w, gr in zip(ws, step_grads):
            w.grad = gr.clone()
        opt.step()
    return ws, opt


# -- independent NumPy transcriptions of the formulas in the issue -----------------------------
def ref_lamb(ws, grads, lr, variant, b1=0.9, b2=0.999, eps=1e-6, wd=0.01, min_coeff=None, max_coeff=None):
    w = [x.numpy().astype(np.float64).copy() for x in ws]
    lam = [wd, 0.0, wd, 0.0]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, step_grads in enumerate(grads, start=1):
        g = [x.numpy().astype(np.float64) for x in step_grads]
        if variant == "nvidia":
            gnorm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
            g = [x / max(1.0, gnorm / 1.0) for x in g]
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            if variant == "deepspeed":
                u = m[i] / (np.sqrt(v[i]) + eps) + lam[i] * w[i]
                step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            else:
                mh, vh = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
                u = mh / (np.sqrt(vh) + eps) + lam[i] * w[i]
                step = lr
            wn, un = np.linalg.norm(w[i]), np.linalg.norm(u)
            r = wn / un if wn > 0 and un > 0 else 1.0
            if variant == "deepspeed" and wn > 0 and un > 0:
                r = min(max(r, min_coeff), max_coeff)
            if variant == "nvidia" and lam[i] == 0:
                r = 1.0
            w[i] = w[i] - step * r * u
    return w


def ref_lars(ws, grads, lr, mu=0.9, wd=0.01, eta=0.001, adapt=(True, True, True, True)):
    w = [x.numpy().copy() for x in ws]
    lam = [wd, 0.0, wd, 0.0]
    buf = [np.zeros_like(x) for x in w]
    for step_grads in grads:
        for i, gt in enumerate(step_grads):
            g = gt.numpy()
            wn, gn = np.linalg.norm(w[i]), np.linalg.norm(g)
            rate = eta * wn / (gn + lam[i] * wn) if wn > 0 and gn > 0 else 1.0
            if not adapt[i]:
                rate = eta
            buf[i] = mu * buf[i] + rate * (g + lam[i] * w[i])
            w[i] = w[i] - lr * buf[i]
    return w


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("variant", ["paper", "nvidia", "deepspeed"])
def test_lamb_variants_match_formula_fp64(variant, impl):
    ws, grads = problem(0, 10)
    kw = dict(min_coeff=0.01, max_coeff=0.3) if variant == "deepspeed" else {}
    got, _ = run_torch(Lamb, ws, grads, lr=0.05, variant=variant, impl=impl, **kw)
    want = ref_lamb(ws, grads, 0.05, variant, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["loop", "foreach"])
def test_lars_matches_formula_fp64(impl):
    ws, grads = problem(1, 10)
    got, _ = run_torch(Lars, ws, grads, lr=0.5, momentum=0.9, trust_coefficient=0.001, impl=impl)
    want = ref_lars(ws, grads, 0.5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["loop", "foreach", "fused"])
def test_lars_adaptation_is_a_group_switch_not_weight_decay(impl):
    """The no-decay group without adaptation steps at lr x trust_coefficient; a group without
    weight decay that keeps ``adapt`` is still adapted (LARS, not plain momentum SGD)."""
    ws, grads = problem(2, 6)
    ws32 = [w.float() for w in ws]
    g32 = [[g.float() for g in step] for step in grads]
    params = [w.clone() for w in ws32]
    groups = [{"params": [params[0], params[2]], "weight_decay": 0.01},
              {"params": [params[1], params[3]], "weight_decay": 0.0, "adapt": False}]
    opt = Lars(groups, lr=0.5, momentum=0.9, trust_coefficient=0.001, impl=impl)
    for step_grads in g32:
        for w, gr in zip(params, step_grads):
            w.grad = gr.clone()
        opt.step()
    want = ref_lars(ws, grads, 0.5, adapt=(True, False, True, False))
    for a, b in zip(params, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=2e-5, atol=1e-7)
    assert opt.trust_ratios()["param2"] == opt.trust_ratios()["param3"] == pytest.approx(0.001)  # group 2


def test_param_groups_exclude_biases_and_norms_from_lars_adaptation():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    decay, no_decay = optim.param_groups(model, 0.01)
    assert decay["adapt"] is True and no_decay["adapt"] is False
    opt = Lars(optim.param_groups(model, 0.01), lr=1.0)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ratios = opt.trust_ratios()
    assert ratios["1.bias"] == ratios["0.bias"] == pytest.approx(0.001)  # lr x 1e-3: SGD at 1e-3
    assert ratios["0.weight"] != pytest.approx(0.001)


def test_nvidia_preclip_only_scales_large_gradients():
    ws, grads = problem(2, 3)
    small = [[g * 1e-3 for g in step] for step in grads]  # global norm < 1: no clipping
    a, _ = run_torch(Lamb, ws, small, lr=0.05, variant="nvidia", impl="loop")
    b, _ = run_torch(Lamb, ws, small, lr=0.05, variant="paper", adapt_no_decay=False, impl="loop")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls,kw", [
    (Lamb, dict(lr=0.01, variant="paper")), (Lamb, dict(lr=0.01, variant="nvidia")),
    (Lamb, dict(lr=0.01, variant="deepspeed")), (Lamb, dict(lr=0.01, eps_inside_sqrt=True)),
    (Lars, dict(lr=0.1, weight_decay=1e-4)),
])
def test_three_code_paths_agree_fp32(cls, kw):
    """loop, foreach and fused (C kernels) agree to 1e-6 relative over 20 steps."""
    ws, grads = problem(3, 20, dtype=torch.float32)
    wd = kw.pop("weight_decay", 0.01)
    results = {}
    for impl in ("loop", "foreach", "fused"):
        results[impl], opt = run_torch(cls, ws, grads, wd=wd, impl=impl, **kw)
        results[impl + "_ratios"] = opt.trust_ratios()
    for impl in ("foreach", "fused"):
        for a, b in zip(results[impl], results["loop"]):
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6
        for name, r in results["loop_ratios"].items():
            assert results[impl + "_ratios"][name] == pytest.approx(r, rel=1e-6)


@pytest.mark.parametrize("impl", ["loop", "foreach", "fused"])
@pytest.mark.parametrize("variant", ["nvidia", "deepspeed"])
def test_keep_grads_leaves_gradients_and_changes_nothing_else(impl, variant):
    """keep_grads=True: every gradient is bitwise what it was given; the weights are those of the
    default (gradients used as scratch) to float rounding."""
    ws, grads = problem(4, 6, dtype=torch.float32)
    given = [[g.clone() for g in step] for step in grads]
    kept = [w.clone() for w in ws]
    opt = Lamb(groups_of(kept), lr=0.02, variant=variant, impl=impl, keep_grads=True)
    for step_grads, originals in zip(grads, given):
        for w, g in zip(kept, step_grads):
            w.grad = g
        opt.step()
        for w, g in zip(kept, originals):
            assert torch.equal(w.grad, g)
    scratch, _ = run_torch(Lamb, ws, grads, lr=0.02, variant=variant, impl=impl)
    for a, b in zip(kept, scratch):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_a_gradient_tensor_shared_by_two_weights_is_not_used_as_scratch(impl):
    """Two weights given the same gradient tensor: writing u into it would hand each the other's
    update, so the step must behave as with keep_grads=True."""
    ws, _ = problem(7, 0, dtype=torch.float32)
    a, b = ws[0].clone(), ws[0].clone() * 2
    shared = torch.randn(a.shape) * 0.1
    kept = [a.clone(), b.clone()]
    for pair, kw in (((a, b), {}), (kept, {"keep_grads": True})):
        opt = Lamb(list(pair), lr=0.05, variant="nvidia", impl=impl, **kw)
        for _ in range(3):
            grad = shared.clone()
            for w in pair:
                w.grad = grad
            opt.step()
    for got, ref in zip((a, b), kept):
        assert torch.equal(got, ref)


def test_fused_kernels_are_built_here():
    from optim import _native

    assert _native.library() is not None, _native.error()


def test_edge_cases_zero_weights_and_zero_grads():
    w_zero = torch.zeros(4, 3, dtype=torch.float64)
    w_live = torch.randn(4, 3, dtype=torch.float64)
    w_frozen = torch.randn(6, dtype=torch.float64)
    opt = Lamb([w_zero, w_live, w_frozen], lr=0.1, weight_decay=0.1, impl="loop")
    before = w_live.clone(), w_frozen.clone()
    w_zero.grad = torch.ones_like(w_zero)
    w_live.grad = torch.zeros_like(w_live)  # u = λw: ratio ‖w‖/‖λw‖ = 1/λ, step = lr·w
    w_frozen.grad = torch.zeros_like(w_frozen)
    opt.step()
    ratios = opt.trust_ratios()
    assert ratios["param0"] == 1.0  # ‖w‖ = 0
    assert ratios["param1"] == pytest.approx(10.0)
    torch.testing.assert_close(w_live, before[0] * (1 - 0.1))
    # zero weight, unit grad: u = 1/(1+eps) everywhere, ratio 1, w = -lr·u
    torch.testing.assert_close(w_zero, torch.full_like(w_zero, -0.1 / (1 + 1e-6)))


def test_zero_update_leaves_tensor_and_ratio_one():
    w = torch.zeros(5)
    opt = Lamb([w], lr=0.1, impl="fused")
    w.grad = torch.zeros(5)
    opt.step()
    assert torch.equal(w, torch.zeros(5)) and opt.trust_ratios()["param0"] == 1.0


def test_knobs_override_the_preset():
    ws, grads = problem(4, 3)
    a, oa = run_torch(Lamb, ws, grads, lr=0.05, variant="paper", max_coeff=0.3, min_coeff=0.0, impl="loop")
    assert max(oa.trust_ratios().values()) <= 0.3
    b, _ = run_torch(Lamb, ws, grads, lr=0.05, variant="deepspeed", bias_correction=False, impl="loop")
    c, _ = run_torch(Lamb, ws, grads, lr=0.05, variant="deepspeed", impl="loop")
    assert not torch.allclose(b[0], c[0])


def test_bad_arguments_are_named():
    w = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="unknown LAMB variant 'apex'.*deepspeed.*nvidia.*paper"):
        Lamb(w, variant="apex")
    with pytest.raises(TypeError, match="unknown keyword.*max_coef"):
        Lamb(w, max_coef=1.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        Lamb(w, impl="cuda")
    with pytest.raises(ValueError, match="bias_correction"):
        Lamb(w, bias_correction="sometimes")
    with pytest.raises(ValueError, match="betas"):
        Lamb(w, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="trust_coefficient"):
        Lars(w, lr=0.1, trust_coefficient=0.0)


def test_foreign_tensor_is_refused_not_silently_wrong():
    """What DeepSpeed does when a layer-wise optimizer is passed to it without optim.initialize."""
    w = torch.randn(4, requires_grad=True)
    opt = Lamb([w], lr=0.1)
    flat = torch.randn(4)
    flat.grad = torch.randn(4)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="optim.initialize"):
        opt.step()


def test_trust_ratios_are_named_by_param_groups_helper():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = Lamb(optim.param_groups(model, 0.01), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    r = opt.trust_ratios()
    assert set(r) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert all(v > 0 for v in r.values())
    w = model[0].weight.detach()
    assert r["0.weight"] != 1.0 and w.norm() > 0


def test_state_dict_round_trip_continues_identically():
    ws, grads = problem(5, 6, dtype=torch.float32)
    straight, _ = run_torch(Lamb, ws, grads, lr=0.05, variant="nvidia")
    first = [w.clone() for w in ws]
    opt = Lamb(groups_of(first), lr=0.05, variant="nvidia")
    for step_grads in grads[:3]:
        for w, g in zip(first, step_grads):
            w.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    resumed = [w.detach().clone() for w in first]
    opt2 = Lamb(groups_of(resumed), lr=0.05, variant="nvidia")
    opt2.load_state_dict(saved)
    for step_grads in grads[3:]:
        for w, g in zip(resumed, step_grads):
            w.grad = g.clone()
        opt2.step()
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


# -- registry -------------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert {"Lamb", "Lars", "AdamW", "SGD"} <= set(optim.known())
    w = [torch.zeros(2, requires_grad=True)]
    assert isinstance(optim.create("lamb", w, lr=0.1), Lamb)
    with pytest.raises(ValueError, match=r"unknown optimizer 'Adafactor'; registered: .*Lamb.*Lars"):
        optim.create("Adafactor", w)

    @optim.register("TestOnlySGD", exact_under_zero=False)
    def _make(params, **kw):
        return torch.optim.SGD(params, **kw)

    assert isinstance(optim.create("testonlysgd", w, lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="already registered"):
        optim.register("TestOnlySGD")(_make)


# -- param groups ----------------------------------------------------------------------------
class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 2, bias=False)
        self.scale = nn.Parameter(torch.ones(2))  # 1-D: no decay
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


def test_param_groups_exclude_bias_and_norm_for_any_module():
    groups = optim.param_groups(Odd(), 0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["param_names"] == ["conv.weight", "proj.weight"]
    assert sorted(no_decay["param_names"]) == ["bn.bias", "bn.weight", "conv.bias", "scale"]


def test_param_groups_bert_names():
    from transformers import BertConfig, BertForPreTraining

    model = BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32))
    decay, no_decay = optim.param_groups(model, 0.01)
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay["param_names"])
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decay["param_names"])
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total
