"""``pretrain/run.py`` whose forward raises at one micro-batch: a crash mid-training, the fault a
test injects (production code has no hook for it).

    python tests/crash_run.py MICRO_BATCH run.py-arguments...

MICRO_BATCH counts forward passes from 1 on this rank."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain.run as run  # noqa: E402

AT = int(sys.argv.pop(1))
_build_model = run.build_model


def build_model(*args, **kwargs):
    model = _build_model(*args, **kwargs)
    passes = [0]

    def fail(module, inputs):
        if module.training:
            passes[0] += 1
            if passes[0] == AT:
                raise RuntimeError("injected fault in forward")

    model.register_forward_pre_hook(fail)
    return model


run.build_model = build_model
run.entry()
