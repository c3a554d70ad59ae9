"""optim.initialize with DeepSpeed-style configs, in this process (world size 1)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from torch import nn

import optim


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    from pretrain.distributed import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    init_distributed()
    yield
    for k, v in saved.items():  # later tests launch their own ranks; do not leak rank 0 of 1 to them
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))


def config(opt, **extra):
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "optimizer": opt, "steps_per_print": 10**9}
    cfg.update(extra)
    return cfg


def train(engine, steps=3):
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_lamb_from_json_file_trains_with_schedule(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config(
        {"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 0.01, "variant": "nvidia"}},
        scheduler={"type": "WarmupPolyDecay", "params": {"total_num_steps": 10, "warmup_num_steps": 2}},
        zero_optimization={"stage": 2})))
    engine, opt, _, sched = optim.initialize(model=model(), config=str(path))
    assert isinstance(engine.basic_optimizer, optim.Lamb)
    assert engine.basic_optimizer.param_groups[1]["weight_decay"] == 0.0  # biases, LayerNorm
    losses = train(engine, 6)
    assert losses[-1] < losses[0]
    assert engine.get_lr()[0] == pytest.approx(0.01 * (1 - 7 / 10) ** 0.5)
    assert len(engine.basic_optimizer.trust_ratios()) == 6


def test_unknown_optimizer_type_names_the_choices():
    with pytest.raises(ValueError, match=r"'Lamb2' is unknown: registered here: .*Lamb.*DeepSpeed's own: .*adam"):
        optim.initialize(model=model(), config=config({"type": "Lamb2", "params": {}}))


def test_double_clipping_is_refused():
    with pytest.raises(ValueError, match="gradient_clipping.*grad_pre_normalization"):
        optim.initialize(model=model(), config=config(
            {"type": "Lamb", "params": {"lr": 0.01, "variant": "nvidia"}}, gradient_clipping=1.0))


def test_bad_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"optimizer": {"type": "Lamb",}')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 1"):
        optim.initialize(model=model(), config=str(bad))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        optim.initialize(model=model(), config=str(tmp_path / "missing.json"))


def test_deepspeed_own_optimizer_passes_through():
    engine, *_ = optim.initialize(model=model(), config=config({"type": "SGD", "params": {"lr": 0.1}}))
    assert isinstance(engine.basic_optimizer, torch.optim.SGD)  # ours (registered), same class
    engine, *_ = optim.initialize(model=model(), config=config({"type": "Adagrad", "params": {"lr": 0.1}}))
    assert type(engine.basic_optimizer).__name__ == "Adagrad"


def test_a_nan_gradient_with_a_finite_loss_is_applied_by_deepspeed_and_stops_the_accountant():
    """Why run.py checks the gradient norm: with bf16.check_grad_overflow off (the shipped
    configs), DeepSpeed's bf16 ZeRO optimizer applies a step whose gradients hold NaN (in fp32 it
    skips it); its global gradient norm says so, and the step accountant stops the run on it."""
    from pretrain.steps import StepAccountant, TrainingDiverged

    net = model()
    engine, *_ = optim.initialize(model=net, config=config(
        {"type": "Lamb", "params": {"lr": 1e-2, "variant": "nvidia"}}, zero_optimization={"stage": 1},
        bf16={"enabled": True, "check_grad_overflow": False}))
    acct = StepAccountant(engine, torch.device("cpu"), lag=0)
    poison = {"on": False}
    net[0].weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        poison["on"] = step == 1
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
        loss = nn.functional.mse_loss(engine(x.bfloat16()).float(), y)
        assert torch.isfinite(loss)
        engine.backward(loss)
        engine.step()
        if step == 0:
            assert not acct.end_step(False).stop
    assert not torch.isfinite(torch.as_tensor(engine.get_global_grad_norm())).all()
    assert not all(torch.isfinite(p).all() for p in engine.module.parameters())  # applied, not skipped
    with pytest.raises(TrainingDiverged, match="gradient norm"):
        acct.end_step(False)
