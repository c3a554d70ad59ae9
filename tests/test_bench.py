"""The benchmarks' own logic that needs no accelerator: bench/engine_step.py's modes, and how
bench/gpu_check.py (its stages in bench/gpucheck/) reports, configures and reads its runs."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import engine_step
from bench.gpucheck import runner, runs
from bench.gpucheck.squad_stage import first_questions

REPO = Path(__file__).resolve().parents[1]
SHIPPED = json.loads((REPO / "ds_configs" / "lamb_64k.json").read_text())


def test_an_engine_mode_carries_config_overrides_as_json_values():
    base, sets = engine_step.parse_mode("zero1+bf16.check_grad_overflow=true+zero_optimization.reduce_bucket_size=1000")
    assert base == "zero1" and sets == {"bf16.check_grad_overflow": True, "zero_optimization.reduce_bucket_size": 1000}
    cfg = engine_step.engine_config("zero1+bf16.check_grad_overflow=true+zero_optimization.reduce_bucket_size=1000",
                                    micro=8, accum=2, bf16=True)
    assert cfg["bf16"] == {**SHIPPED["bf16"], "enabled": True, "check_grad_overflow": True}
    assert cfg["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 2


def test_a_plain_mode_is_the_shipped_config_at_its_stage():
    cfg = engine_step.engine_config("zero2", micro=8, accum=2, bf16=True)
    assert cfg["bf16"] == {**SHIPPED["bf16"], "enabled": True}  # the shipped check_grad_overflow kept
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["optimizer"]["type"] == SHIPPED["optimizer"]["type"] and "pretrain" not in cfg


@pytest.mark.parametrize("mode, message", [
    ("zero4", "a mode is one of bare, zero0, zero1, zero2"),
    ("bare+bf16.enabled=true", "a mode is one of"),
    ("zero2+bf16.check_grad_overflow", "is not key=value"),
    ("zero2+bf16.check_grad_overflow=nope", "'nope' is not a JSON value"),
])
def test_a_bad_mode_is_named(mode, message):
    with pytest.raises(ValueError, match=message):
        engine_step.parse_mode(mode)


def test_a_plus_inside_a_value_is_part_of_it():
    assert engine_step.parse_mode("zero2+zero_optimization.reduce_bucket_size=5e+8+bf16.enabled=true") == \
        ("zero2", {"zero_optimization.reduce_bucket_size": 5e8, "bf16.enabled": True})
    with pytest.raises(ValueError, match="train_batch_size in train_batch_size.x is not an object"):
        engine_step.engine_config("zero2+train_batch_size.x=1", micro=8, accum=2, bf16=True)


def test_profiles_follow_the_modes_and_can_be_left_out():
    assert engine_step.parse_args(["--modes", "bare,zero1,zero2"]).profiled == ["bare", "zero2"]
    # gpu_check's stage f: one mode, no profile (the default profile names a mode not run)
    assert engine_step.parse_args(["--modes", "zero2", "--no-profile", "--compile", "aot_eager"]).profiled == []
    with pytest.raises(SystemExit):
        engine_step.parse_args(["--modes", "zero2"])  # profiling "bare", which is not run


def test_engine_step_loads_the_shared_helpers_not_gpu_check():
    # gpu_check's stage e runs engine_step; engine_step importing gpu_check back was a circle
    code = "import sys, bench.engine_step; print(sorted(m for m in sys.modules if m.startswith('bench')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(["bench", "bench.engine_step", "bench.gpucheck", "bench.gpucheck.common"])


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--stages", "a,x", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--stages: x: choose among a,b,o,d,e,c,f,g,s,v")
    assert not (tmp_path / "gpu_check.jsonl").exists()


def test_each_stage_is_on_disk_as_it_ends_and_a_failing_one_does_not_stop_the_rest(tmp_path, monkeypatch, capsys):
    def broken(args, report, state):
        raise RuntimeError("the device went away")

    def fine(args, report, state):
        # the previous stage's line is already in the file when the next stage starts
        assert [json.loads(x)["stage"] for x in (args.out / "gpu_check.jsonl").read_text().splitlines()] == ["env", "a"]
        report("b.step", True, {"median_ms": {"LAMB default": 1.5}}, "LAMB default 1.50 ms")

    monkeypatch.setitem(runner.STAGES, "a", (broken, 0))
    monkeypatch.setitem(runner.STAGES, "b", (fine, 0))
    data = tmp_path / "data"
    (data / "seq128").mkdir(parents=True)
    (data / "seq128" / "manifest.json").write_text("{}")  # present: no corpus is built
    args = argparse.Namespace(out=tmp_path / "out", smoke=True, data=data, model="bert-tiny", micro=8, accum=2,
                              steps=10, stage_timeout=90)
    assert runner.run(args, ["a", "b"]) == 1
    lines = [json.loads(x) for x in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["ok"]) for r in lines] == [("env", None), ("a", False), ("b.step", True)]
    assert lines[1]["error"] == "RuntimeError: the device went away"
    assert lines[2]["median_ms"] == {"LAMB default": 1.5}
    printed = capsys.readouterr().out.splitlines()  # DeepSpeed's own log lines come first
    rows = [x.split() for x in printed[printed.index(f"{'stage':<10} {'result':<6} {'wall s':>7}  figures"):]
            if not x.startswith("{")]
    assert [r[:2] for r in rows] == [["stage", "result"], ["env", "INFO"], ["a", "FAIL"], ["b.step", "PASS"]]
    assert rows[2][3:] == ["RuntimeError:", "the", "device", "went", "away"]


def test_stage_c_configs_are_the_shipped_one_at_the_checks_size(tmp_path):
    args = argparse.Namespace(micro=8, accum=2, lr=2e-3, steps=10, fp16_steps=6, model="bert-tiny", data=Path("/d"))
    auto = json.loads(runs.run_config(args, tmp_path, "auto").read_text())
    assert auto["bf16"] == {**SHIPPED["bf16"], "enabled": "auto"} and auto["fp16"]["enabled"] == "auto"
    assert (auto["train_batch_size"], auto["train_micro_batch_size_per_gpu"]) == (16, 8)
    assert auto["zero_optimization"] == {"stage": 2} and auto["optimizer"]["params"]["lr"] == 2e-3
    assert auto["pretrain"]["max_steps"] == 10 and auto["pretrain"]["data"] == "/d/seq128"
    assert auto["pretrain"]["compile"] == "off" and auto["pretrain"]["checkpoint_every"] == 0
    fp16_path = runs.run_config(args, tmp_path, "fp16")
    fp16 = json.loads(fp16_path.read_text())
    assert fp16_path.name == "config_fp16.json" and "bf16" not in fp16
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0 and fp16["pretrain"]["max_steps"] == 6
    assert runs.run_config(args, tmp_path, "auto", compile="default").name == "config_auto_compiled.json"


def test_run_figures_are_medians_past_the_warm_up_and_last_values(tmp_path):
    recs = [{"step": s, "loss": 10.0 - s, "samples_per_s": rate, "loss_scale": scale, "peak_mem_gib": 1.0 + s}
            for s, rate, scale in ((1, 1.0, 65536), (2, 2.0, 65536), (3, 30.0, 32768), (4, 10.0, 32768),
                                   (5, 20.0, 16384))]
    lines = [json.dumps(r) for r in recs] + [json.dumps({"step": 5, "eval_loss": 3.0}), '{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert runs.losses(tmp_path) == {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0, 5: 5.0}
    assert runs.throughput(tmp_path, skip=2) == {"samples_per_s": 20.0, "peak_mem_gib": 6.0, "loss_scale": 16384}
    assert runs.throughput(tmp_path, skip=5) == {}


def test_the_squad_slice_keeps_the_first_questions_in_order():
    squad = {"version": "1.1", "data": [
        {"title": "A", "paragraphs": [{"context": "a1", "qas": [{"id": "1"}, {"id": "2"}]},
                                      {"context": "a2", "qas": [{"id": "3"}]}]},
        {"title": "B", "paragraphs": [{"context": "b1", "qas": [{"id": "4"}, {"id": "5"}]},
                                      {"context": "b2", "qas": [{"id": "6"}]}]}]}
    cut = first_questions(squad, 4)
    assert cut["version"] == "1.1" and [a["title"] for a in cut["data"]] == ["A", "B"]
    assert [[q["id"] for p in a["paragraphs"] for q in p["qas"]] for a in cut["data"]] == [["1", "2", "3"], ["4"]]
    assert [p["context"] for p in cut["data"][1]["paragraphs"]] == ["b1"]
    assert first_questions(squad, 2)["data"] == [{"title": "A", "paragraphs": [squad["data"][0]["paragraphs"][0]]}]
