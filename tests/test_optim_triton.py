"""The Triton kernels (the default optimizer step on GPUs) against the per-tensor loop.

Triton's interpreter runs the kernels on CPU tensors, so their math is checked here without a
GPU: every LAMB variant, LARS, a ZeRO-style flat partition (segments cut at both ends, padding
between them), bf16, and a failure forced at each kernel (the step falls back to foreach with a
warning and gives the same result). The interpreter needs ``TRITON_INTERPRET=1`` before triton
decorates the kernels, so the cases run in a process of their own
(``tests/optim_triton_worker.py``). On a GPU, ``bench/gpu_check.py`` stage a repeats the
comparison with compiled kernels and checks that no step compiles a new kernel variant.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import optim

pytest.importorskip("triton")
WORKER = Path(__file__).with_name("optim_triton_worker.py")
CASES = ["lamb_paper", "lamb_nvidia", "lamb_deepspeed", "lamb_eps_inside", "lamb_keep_grads", "lars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(WORKER), str(free_port())], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_is_available(results):
    assert results["available"] is None


@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_loop_in_fp32(results, case):
    r = results[case]
    assert r["rel"] <= 1e-6, r
    assert r["ratio_rel"] <= 1e-6, r
    assert r["cpu_default_rel"] <= 1e-6, r  # the CPU default (C kernels) is still in use and right
    assert not r["warnings"], r["warnings"]


@pytest.mark.parametrize("case", CASES)
def test_kernels_on_a_zero_flat_partition(results, case):
    z = results[case]["zero"]
    assert z["rel"] <= 1e-6 and z["ratio_rel"] <= 1e-6, z
    assert z["padding_untouched"]


@pytest.mark.parametrize("case", CASES)
def test_kernels_in_bf16(results, case):
    """bf16 weights, gradients and moments, against the fp32 loop. The interpreter converts
    float32 to bfloat16 by truncation (a GPU rounds to nearest), so its error is a few times the
    bf16 loop's; both stay within bf16's precision over the run."""
    r = results[case]
    assert r["bf16_loop_rel"] <= 1e-2
    assert r["bf16_rel"] <= 3e-2, r


@pytest.mark.parametrize("where", ["lamb_pass1", "lamb_pass2", "sumsq2", "lars_apply"])
def test_a_failing_kernel_falls_back_with_a_warning(results, where):
    r = results[f"fail_{where}"]
    assert r["failed"] == ["triton"]
    assert any("triton kernels failed" in w and "forced failure" in w for w in r["warnings"]), r["warnings"]
    assert r["rel"] <= 1e-6


def test_triton_without_a_backend_warns_and_steps_with_foreach():
    """CPU tensors without the interpreter: the warning shows although impl was not asked
    explicitly for a fused path, and the step is still right."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(10, 3, generator=g)
    grad = torch.randn(10, 3, generator=g)
    out = {}
    for impl in ("loop", "triton"):
        w = w0.clone().requires_grad_(True)
        opt = optim.Lamb([w], lr=0.1, impl=impl)
        w.grad = grad.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        out[impl] = (w.detach(), [str(c.message) for c in caught])
    assert torch.allclose(out["triton"][0], out["loop"][0], rtol=1e-6, atol=0)
    assert any("Triton kernels unavailable" in m and "TRITON_INTERPRET" in m for m in out["triton"][1])


def test_a_kernel_failing_after_part_of_the_pass_ran_stops_instead_of_redoing_it(results):
    """The fallback redoes a whole pass; after a partial launch that would apply part twice."""
    assert results["partial_launch"].startswith("raised: Triton kernel failed after part of the pass ran")
