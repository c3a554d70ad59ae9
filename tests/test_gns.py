"""The gradient noise scale estimator against a problem whose noise is known in closed form
(least squares with Gaussian inputs and noise: tests/distributed/gns_worker.py), through a
DeepSpeed engine: one process without ZeRO (micro-batches against the accumulated gradient) and
2 ranks under ZeRO-2 with accumulation (DeepSpeed's global norm of the reduced gradient), launched
by ``mpiexec`` (the DeepSpeed launcher's own tests are in test_pretrain_signals.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.gns import NoiseScale
from tests.pretrain_helpers import mpiexec

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "gns_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(base, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))


def check(result: dict) -> None:
    truth, mean = result["truth"], result["mean"]
    assert result["measurements"] == 800
    for key in ("g2", "trace", "b_simple"):  # the unbiased estimates, averaged over the run
        assert mean[key] == pytest.approx(truth[key], rel=0.10), (key, mean, truth)
    rec = result["record"]  # what the log shows: moving averages, noisier
    assert rec["gns_b_simple"] == pytest.approx(truth["b_simple"], rel=0.25), rec
    assert 0 < rec["gns_b_simple_err"] < 0.25 * truth["b_simple"]


@pytest.mark.slow
def test_single_process_micro_batches_against_the_accumulated_gradient(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--stage", "0", "--accum", "4"],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(json.loads(out.read_text()))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_under_zero2_with_accumulation(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(WORKER), "--out", str(out), "--stage", "2",
                           "--accum", "2"], env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    check(result)


class _Engine:
    def __init__(self):
        import torch

        self.module = torch.nn.Linear(2, 1)
        self.device = torch.device("cpu")


def test_one_micro_batch_per_step_cannot_measure():
    ns = NoiseScale(_Engine(), every=1, ema=0.9, micro=8, glob=8, accum=1)
    assert not ns.enabled
    ns.begin_step(1)
    assert not ns._handles and ns.record() == {}


class _BertEngine:
    """What NoiseScale reads of an engine, around bert-tiny in the given precision."""

    def __init__(self, dtype):
        import torch

        from pretrain.model import build_model

        self.module = build_model("bert-tiny", 300, seed=0).to(dtype)
        self.device = torch.device("cpu")

    def zero_optimization_stage(self):
        return 2  # the big-batch norm is DeepSpeed's: only the micro-batch hooks run here


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_micro_batch_norm_equals_the_sum_of_squares_of_the_gradients(dtype):
    """The hooks' |g_k|² (one fp32-accumulating norm per tensor, no fp32 copy of the gradient)
    equals the former count, sum over tensors of g.float().square().sum(), for each micro-batch."""
    import torch

    engine = _BertEngine(getattr(torch, dtype))
    ns = NoiseScale(engine, every=1, ema=0.9, micro=2, glob=4, accum=2)
    ns.begin_step(1)
    g = torch.Generator().manual_seed(0)
    expected = []
    for _ in range(2):
        ids = torch.randint(5, 300, (2, 16), generator=g)
        out = engine.module(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                            masked_lm_positions=torch.randint(1, 15, (2, 3), generator=g),
                            masked_lm_labels=torch.randint(5, 300, (2, 3), generator=g),
                            next_sentence_label=torch.randint(0, 2, (2,), generator=g))
        engine.module.zero_grad()
        out.loss.backward()
        ns.end_micro(boundary=False)
        expected.append(sum(float(p.grad.float().square().sum()) for p in ns.params))
    ns.detach()
    assert len(ns.params) == len(list(engine.module.parameters())) > 30
    total, count = ns._small.tolist()
    assert count == 2
    assert total == pytest.approx(sum(expected), rel=1e-6)
