"""``pretrain.compile``: regional compilation (each encoder layer, one graph for all of them),
"auto" by the accelerator, compiled runs of run.py that train as the eager ones, and a graph
count that does not grow with the packed row count.

The compiled runs use inductor as on a GPU, on the CPU (a C++ compiler builds its kernels), in a
fresh cache directory per test, so they pay the first compilation as a fresh machine does. Dropout
stays on: inductor draws its random numbers through ATen (``fallback_random``, set by the test's
launcher below, not by run.py), so the compiled layers drop what the eager ones drop.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import config as config_mod
from pretrain.model import build_model, compile_layers, resolve_compile
from tests.pretrain_helpers import ROOT, RUN, env

# python -c LAUNCH run.py ARGS: run.py as users run it, with inductor's random numbers from ATen's
# generator (eager's draws: the same dropout masks)
LAUNCH = ("import runpy, sys, torch._inductor.config as c; c.fallback_random = True; "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
STEPS = 5


def train(work: Path, out: str, cache: Path, *extra: str) -> tuple[str, list[dict]]:
    """run.py on bert-tiny, fp32, one micro-batch of 16 per step (so each record's positions give
    one micro-batch's rows), no held-out evaluation; (log, metrics records with a loss)."""
    cmd = [sys.executable, "-c", LAUNCH, str(RUN), "--config", str(ROOT / "ds_configs/cpu_seq128.json"),
           "--data", "data/seq128", "--output", out, "--max-steps", str(STEPS), "--train-batch-size", "16",
           "--micro-batch-size", "16", "--set", "bf16.enabled=false", "--set", "pretrain.log_every=1",
           "--set", "pretrain.validation_shards=0", "--set", "pretrain.gns_every=0", *extra]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600,
                          env=dict(env(), TORCHINDUCTOR_CACHE_DIR=str(cache), TORCHINDUCTOR_COMPILE_THREADS="1"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    recs = [json.loads(x) for x in (work / out / "metrics.jsonl").read_text().splitlines()]
    return log, [r for r in recs if "loss" in r]


@pytest.mark.slow  # ~40 s each on 2 CPU cores, most of it inductor's first compilation
@pytest.mark.parametrize("packing", ["off", "ffd"])
def test_layer_compiled_run_trains_as_the_eager_one(pretrain_work, tmp_path, packing):
    from pretrain.checkpoint import fp32_state_dict, tag_for

    outs = {name: f"compile_{packing}_{name}" for name in ("eager", "layers")}
    for name in outs.values():
        subprocess.run(["rm", "-rf", str(pretrain_work / name)], check=True)
    pack = ["--set", f"pretrain.packing={packing}"]
    # the config has no pretrain.compile: "auto", which is eager on the CPU
    log_e, eager = train(pretrain_work, outs["eager"], tmp_path / "inductor", *pack)
    log_c, compiled = train(pretrain_work, outs["layers"], tmp_path / "inductor", *pack,
                            "--set", "pretrain.compile=layers")

    assert ", compile off (auto on cpu)" in log_e and "model compiled" not in log_e
    assert "model compiled (layers: 2 encoder layers, inductor)" in log_c
    for name, mode in (("eager", "off"), ("layers", "layers")):  # the resolved mode is recorded
        assert json.loads((pretrain_work / outs[name] / "config.effective.json").read_text())["pretrain"]["compile"] == mode

    assert [r["step"] for r in eager] == [r["step"] for r in compiled] == list(range(1, STEPS + 1))
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-5), (e["step"], e["loss"], c["loss"])
        assert c["mlm_loss"] == pytest.approx(e["mlm_loss"], rel=1e-5)
    # One graph from the first step on: both layers share it, and the packed micro-batches' row
    # counts (several) are one dynamic dimension of it, not a recompilation each
    rows = [r["work"]["positions"] // 128 for r in compiled]
    if packing == "ffd":
        assert len(set(rows)) >= 2, rows
    else:
        assert rows == [16] * STEPS
    assert [r["compiled_graphs"] for r in compiled] == [1] * STEPS, (rows, [r["compiled_graphs"] for r in compiled])
    assert [r["compiled_graphs"] for r in eager] == [0] * STEPS
    assert "| graphs 1 |" in log_c and "| graphs" not in log_e

    # the checkpoint has the eager run's names (and, five LAMB steps on, its weights)
    we = fp32_state_dict(pretrain_work / outs["eager"] / "checkpoints", tag_for(STEPS))
    wc = fp32_state_dict(pretrain_work / outs["layers"] / "checkpoints", tag_for(STEPS))
    assert wc.keys() == we.keys()
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-4, atol=1e-5, msg=k)


def test_layer_compilation_keeps_the_module_and_shares_one_graph():
    """In place: state_dict keys (what checkpoints and the export hold) are the eager model's, and
    both layers run one graph (Dynamo's ``eager`` backend: tracing without inductor's kernels)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager, compiled = build_model("bert-tiny", 500, seed=1), build_model("bert-tiny", 500, seed=1)
    names = list(eager.state_dict())
    assert compile_layers(compiled, backend="eager", dynamic_rows=True) == 2
    assert list(compiled.state_dict()) == names
    assert all(not k.startswith("_orig_mod") and "._orig_mod." not in k for k in names)
    compiled.load_state_dict(eager.state_dict())  # and it loads the eager model's checkpoint as is
    eager.eval()
    compiled.eval()
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    for rows in (3, 5, 4):  # packed-like row counts: one graph, dimension 0 dynamic from the start
        ids = torch.randint(5, 500, (rows, 32), generator=g)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            a = eager.bert(input_ids=ids, attention_mask=mask)[0]
            b = compiled.bert(input_ids=ids, attention_mask=mask)[0]
        torch.testing.assert_close(b, a)
    assert counters["stats"]["unique_graphs"] == 1


def test_auto_is_layers_on_accelerators_and_off_on_the_cpu():
    assert resolve_compile("auto", "cpu") == "off"
    assert resolve_compile("auto", "cuda") == "layers" and resolve_compile("auto", "xpu") == "layers"
    assert resolve_compile("auto") == "off"  # this machine: DeepSpeed's accelerator is the CPU
    assert resolve_compile("default", "cuda") == "model"  # the name of earlier configs
    for kept in ("off", "layers", "model", "aot_eager", "inductor"):
        assert resolve_compile(kept, "cuda") == kept
    for path in sorted((ROOT / "ds_configs").glob("*.json")):  # every pretraining config: "auto"
        if "pretrain" in json.loads(path.read_text()):
            assert config_mod.load(path)[1].compile == "auto", path.name


@pytest.mark.parametrize("value, message", [
    ("Layers", "pretrain.compile 'Layers' is not a torch.compile backend (modes 'off', 'auto', 'layers', 'model'"),
    (3, "pretrain.compile must be \"auto\", \"layers\", \"model\", \"off\" or a torch.compile backend name, got 3"),
])
def test_bad_values_are_one_line_and_exit_2(pretrain_work, tmp_path, capsys, value, message):
    from pretrain.run import cli

    assert cli(["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", str(pretrain_work / "data/seq128"),
                "--output", str(tmp_path / "out"), "--set", f"pretrain.compile={json.dumps(value)}"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("pretrain:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "out").exists()
