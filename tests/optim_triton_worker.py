"""Runs the Triton kernels of ``optim`` in Triton's interpreter on CPU tensors and prints, as one
JSON line, how far each case is from the per-tensor loop reference.

Started by ``tests/test_optim_triton.py`` in a process of its own: ``TRITON_INTERPRET=1`` must be
set before triton decorates the kernels, and the test process itself must not be switched.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import optim  # noqa: E402
from optim import _triton  # noqa: E402
from optim._layout import FlatLayout  # noqa: E402

SHAPES = [(70, 50), (50,), (1,), (3, 4, 2), (4099,)]  # 4099 > one block of 4096
STEPS = 6


def problem(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) * 0.1 for s in SHAPES] for _ in range(STEPS)]
    return [w.to(dtype) for w in ws], [[x.to(dtype) for x in gs] for gs in grads]


def groups_of(ws):
    return [{"params": [w for w in ws if w.dim() > 1 or w.numel() > 4000], "weight_decay": 0.01},
            {"params": [w for w in ws if not (w.dim() > 1 or w.numel() > 4000)], "weight_decay": 0.0}]


def run(make, impl, ws, grads):
    ws = [w.clone() for w in ws]
    opt = make(groups_of(ws), impl)
    base = [g["lr"] for g in opt.param_groups]
    for step, gs in enumerate(grads):
        for w, g in zip(ws, gs):
            w.grad = g.clone()
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * (step + 1) / len(grads)  # the step-dependent scalars change every step
        opt.step()
    return ws, opt


def rel(a, b) -> float:
    return max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(a, b))


def ratio_rel(a, b) -> float:
    ra, rb = a.trust_ratios(), b.trust_ratios()
    return max(abs(ra[k] - rb[k]) / abs(rb[k]) for k in rb)


MAKERS = {
    "lamb_paper": lambda g, impl: optim.Lamb(g, lr=0.02, variant="paper", impl=impl),
    "lamb_nvidia": lambda g, impl: optim.Lamb(g, lr=0.02, variant="nvidia", max_grad_norm=0.5, impl=impl),
    "lamb_deepspeed": lambda g, impl: optim.Lamb(g, lr=0.02, variant="deepspeed", max_coeff=0.5, impl=impl),
    "lamb_eps_inside": lambda g, impl: optim.Lamb(g, lr=0.02, eps_inside_sqrt=True, eps=1e-3, impl=impl),
    "lamb_keep_grads": lambda g, impl: optim.Lamb(g, lr=0.02, keep_grads=True, impl=impl),
    "lars": lambda g, impl: optim.Lars(g, lr=0.5, weight_decay=0.01, trust_coefficient=0.01, impl=impl),
}


def zero_layout_case(make):
    """Two flat 'partitions' (rank 0 of 2, as ZeRO cuts them): segments of several tensors, the
    first and last ones partial, padding between segments left alone."""
    ws, grads = problem(seed=1)
    sizes = [w.numel() for w in ws]
    keys, starts, lengths, pos = [], [], [], 0
    for k, n in enumerate(sizes):
        lo = 37 if k == 0 else 0  # tensor 0 begins on the other rank
        hi = n - 5 if k == len(sizes) - 1 else n  # the last one ends there
        keys.append(k)
        starts.append(pos)
        lengths.append(hi - lo)
        pos += hi - lo + 3  # 3 elements of alignment padding
    flat0 = torch.randn(pos, generator=torch.Generator().manual_seed(2))
    flat_grads = [torch.randn(pos, generator=torch.Generator().manual_seed(3 + s)) * 0.1 for s in range(STEPS)]
    out = {}
    for impl in ("loop", "triton"):
        flat = flat0.clone()
        opt = make([{"params": [flat], "weight_decay": 0.01}], impl)
        layout = FlatLayout(keys=keys, starts=starts, lengths=lengths, process_group=None, partitioned=True)
        opt.attach_layouts({id(flat): layout}, [f"t{k}" for k in range(len(sizes))], {id(flat): keys})
        for g in flat_grads:
            flat.grad = g.clone()
            opt.step()
        out[impl] = (flat, opt)
    pad = torch.ones(pos, dtype=torch.bool)
    for s, n in zip(starts, lengths):
        pad[s:s + n] = False
    return {"rel": rel([out["triton"][0]], [out["loop"][0]]), "ratio_rel": ratio_rel(out["triton"][1], out["loop"][1]),
            "padding_untouched": bool(torch.equal(out["triton"][0][pad], flat0[pad]))}


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", sys.argv[1] if len(sys.argv) > 1 else "29597")
    dist.init_process_group("gloo", rank=0, world_size=1)
    results = {"available": _triton.unavailable_reason(torch.device("cpu"))}
    ws, grads = problem()
    ws16, grads16 = problem(torch.bfloat16)
    for name, make in MAKERS.items():
        ref, ref_opt = run(make, "loop", ws, grads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, got_opt = run(make, "triton", ws, grads)
            default_cpu, _ = run(make, "fused", ws, grads)  # the C kernels: the CPU default is unchanged
        bf16, _ = run(make, "triton", ws16, grads16)
        bf16_loop, _ = run(make, "loop", ws16, grads16)
        results[name] = {"rel": rel(got, ref), "ratio_rel": ratio_rel(got_opt, ref_opt),
                         "cpu_default_rel": rel(default_cpu, ref),
                         "bf16_rel": rel(bf16, ref), "bf16_loop_rel": rel(bf16_loop, ref),
                         "warnings": [str(w.message) for w in caught], "zero": zero_layout_case(make)}
    # A failure of the fast path at any call, first included: a warning, and the same result.
    for where in ("lamb_pass1", "lamb_pass2", "sumsq2", "lars_apply"):
        original = getattr(_triton, where)

        def broken(*a, **k):
            raise RuntimeError("forced failure for the test")

        setattr(_triton, where, broken)
        try:
            make = MAKERS["lars" if where in ("sumsq2", "lars_apply") else "lamb_nvidia"]
            ref, _ = run(make, "loop", ws, grads)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                got, opt = run(make, "triton", ws, grads)
            results[f"fail_{where}"] = {"rel": rel(got, ref), "warnings": [str(w.message) for w in caught],
                                        "failed": sorted(opt._failed)}
        finally:
            setattr(_triton, where, original)
    # A failure after part of a pass ran must not fall back (the redo would apply it twice).
    kernel = _triton.lamb_pass1_kernel

    class FailsSecondLaunch:
        calls = 0

        def __getitem__(self, grid):
            def launch(*a, **k):
                FailsSecondLaunch.calls += 1
                if FailsSecondLaunch.calls == 2:
                    raise RuntimeError("second variant does not compile")
                return kernel[grid](*a, **k)
            return launch

    _triton.lamb_pass1_kernel = FailsSecondLaunch()
    try:
        w = torch.randn(5000)  # > one block: an even launch and a masked one
        w.grad = torch.randn(5000)
        opt = optim.Lamb([w], lr=0.01, impl="triton")
        try:
            opt.step()
            results["partial_launch"] = "no error"
        except _triton.PartialLaunchError as exc:
            results["partial_launch"] = f"raised: {exc}"[:200]
    finally:
        _triton.lamb_pass1_kernel = kernel
    print(json.dumps(results))


if __name__ == "__main__":
    main()
