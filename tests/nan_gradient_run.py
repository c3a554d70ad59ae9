"""``pretrain/run.py`` with one gradient element made NaN in one backward pass: the fault a test
injects (production code has no hook for it).

    python tests/nan_gradient_run.py BACKWARD_PASS run.py-arguments...

BACKWARD_PASS counts micro-batches from 1; the loss of that pass stays finite."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain.run as run  # noqa: E402

AT = int(sys.argv.pop(1))
_build_model = run.build_model


def build_model(*args, **kwargs):
    model = _build_model(*args, **kwargs)
    weight = next(p for p in model.parameters() if p.requires_grad and p.dim() == 2)
    passes = [0]

    def poison(grad):
        passes[0] += 1
        if passes[0] != AT:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    weight.register_hook(poison)
    return model


run.build_model = build_model
sys.exit(run.cli())
