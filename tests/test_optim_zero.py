"""LAMB/LARS under DeepSpeed ZeRO on 2 ranks equal the single-process result, per tensor.

One launch of ``mpiexec -n 2`` (ranks found through mpi4py, as ``deepspeed --num_gpus 2`` would
give them; one Python process fewer than DeepSpeed's launcher) trains the small BERT of ``distributed/tiny_bert.py``
for 5 steps in several modes; the reference is the same training in this process with plain
PyTorch (no DeepSpeed). Also shows that a per-partition ("naive") LAMB, what ZeRO users get
without a layout, is far off, so this test would catch a regression to it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optim
from tests.distributed.tiny_bert import batches, make_model
from tests.pretrain_helpers import mpiexec

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).parent / "distributed" / "zero_equivalence.py"
# max_grad_norm well below the gradient norm, so the global-norm pre-clipping (which must see
# every rank's gradients) is active at every step.
LAMB = {"type": "Lamb", "params": {"lr": 0.02, "weight_decay": 0.01, "variant": "nvidia", "max_grad_norm": 0.05}}
LAMB_DS = {"type": "Lamb", "params": {"lr": 0.02, "weight_decay": 0.01, "variant": "deepspeed", "max_coeff": 0.3}}
LARS = {"type": "Lars", "params": {"lr": 0.5, "weight_decay": 0.01, "trust_coefficient": 0.01}}
RUNS = [
    ["lamb_zero1", "zero1", LAMB], ["lamb_zero2", "zero2", LAMB], ["lamb_naive_zero2", "naive_zero2", LAMB],
    ["lamb_bf16_zero0", "bf16_zero0", LAMB],
    ["lamb_bf16_zero2", "bf16_zero2", LAMB], ["lamb_accum_zero2", "accum_zero2", LAMB],
    ["lamb_accum_bf16_zero1", "accum_bf16_zero1", LAMB],
    ["lamb_accum_offload_zero2", "accum_offload_zero2", LAMB], ["lamb_zero3", "zero3", LAMB],
    ["lamb_resume_zero2", "resume_zero2", LAMB], ["lambds_zero2", "zero2", LAMB_DS], ["lars_zero2", "zero2", LARS], ["lars_naive_zero2", "naive_zero2", LARS],
]
# The attention key bias has an identically zero gradient (softmax ignores a shift shared by all
# keys), so its trained value is float rounding noise (~1e-7) and a relative difference is noise.
NOISE_ONLY = ("attention.self.key.bias",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(opt: dict):
    torch.use_deterministic_algorithms(True)
    model = make_model()
    o = optim.create(opt["type"], optim.param_groups(model, opt["params"]["weight_decay"]), **opt["params"])
    for b in batches():
        model(**b).loss.backward()
        o.step()
        o.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, o.trust_ratios()


def max_rel(params: dict, ref: dict) -> float:
    return max(((params[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref
               if not n.endswith(NOISE_ONLY))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    cmd = [mpiexec(), "-n", "2", sys.executable, str(WORKER), "--out", str(out), "--runs", json.dumps(RUNS)]
    rank_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rank_vars}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: more threads only spin in each other's way
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("tag", ["lamb_zero1", "lamb_zero2", "lamb_accum_zero2", "lamb_accum_offload_zero2",
                                 "lambds_zero2", "lars_zero2"])
def test_zero_fp32_matches_single_process(runs, tag):
    opt = next(r[2] for r in RUNS if r[0] == tag)
    ref, ref_ratios = reference(opt)
    got = torch.load(runs / f"{tag}.pt")
    assert max_rel(got["params"], ref) <= 1e-5
    # Telemetry under ZeRO reports the exact per-tensor ratios, for every tensor.
    assert set(got["ratios"]) == set(ref_ratios)
    for name, r in ref_ratios.items():
        assert got["ratios"][name] == pytest.approx(r, rel=1e-4, abs=1e-9), name


@pytest.mark.parametrize("opt_name,exact,naive", [("lamb", "lamb_zero2", "lamb_naive_zero2"),
                                                  ("lars", "lars_zero2", "lars_naive_zero2")])
def test_per_partition_ratios_are_far_off(runs, opt_name, exact, naive):
    opt = LAMB if opt_name == "lamb" else LARS
    ref, _ = reference(opt)
    exact_err = max_rel(torch.load(runs / f"{exact}.pt")["params"], ref)
    naive_err = max_rel(torch.load(runs / f"{naive}.pt")["params"], ref)
    assert naive_err > 1e-2
    assert naive_err > 1000 * exact_err


def global_rel(params: dict, ref: dict) -> float:
    diff = sum(((params[n] - ref[n]).norm() ** 2).item() for n in ref)
    return (diff / sum((ref[n].norm() ** 2).item() for n in ref)) ** 0.5


def max_ratio_rel(ratios: dict, ref_ratios: dict) -> float:
    return max(abs(ratios[k] - r) / r for k, r in ref_ratios.items())


# bf16 runs are slow on CPUs without bf16 instructions: one of each wrapper (the unfused optimizer
# without ZeRO, ZeRO-2, ZeRO-1's persistent fp32 gradient buffer with accumulation).
@pytest.mark.parametrize("tag", ["lamb_bf16_zero0", "lamb_bf16_zero2", "lamb_accum_bf16_zero1"])
def test_zero_bf16_follows_fp32_trajectory(runs, tag):
    """bf16 weights differ from fp32 by rounding (2^-8 relative), so compare the whole model
    and the exact per-tensor trust ratios."""
    ref, ref_ratios = reference(LAMB)
    got = torch.load(runs / f"{tag}.pt")
    assert global_rel(got["params"], ref) < 1e-2
    assert max_ratio_rel(got["ratios"], ref_ratios) < 1e-2


def test_zero_checkpoint_resume_is_bitwise_identical(runs):
    """Optimizer state (moments, step) saves and restores through ZeRO-2 checkpoints."""
    straight = torch.load(runs / "lamb_zero2.pt")
    resumed = torch.load(runs / "lamb_resume_zero2.pt")
    assert resumed["losses"] == straight["losses"]
    for name, p in straight["params"].items():
        assert torch.equal(resumed["params"][name], p), name


def test_preclipping_was_active(runs):
    """The reference's global gradient norm exceeds max_grad_norm, so clipping mattered."""
    model = make_model()
    batch = batches()[0]
    model(**batch).loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm > 4 * LAMB["params"]["max_grad_norm"]


def test_zero3_is_refused_with_a_clear_error(runs):
    msg = (runs / "lamb_zero3.error.txt").read_text()
    assert "ZeRO stage 3" in msg and "stage to 1 or 2" in msg


def test_gradients_are_scratch_except_under_cpu_offload(runs):
    """ZeRO-Offload keeps one gradient buffer for the whole run and refreshes only the fragments
    of parameters that got a gradient, so there the optimizer must leave gradients alone."""
    assert torch.load(runs / "lamb_accum_offload_zero2.pt")["keep_grads"] is True
    assert torch.load(runs / "lamb_accum_zero2.pt")["keep_grads"] is False
