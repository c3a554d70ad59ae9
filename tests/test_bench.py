"""The benchmarks' own logic that needs no accelerator: bench/engine_step.py's modes, and how
bench/gpu_check.py (its stages in bench/gpucheck/) reports, budgets, configures and reads its runs."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import engine_step
from bench.gpucheck import common, efficiency, procs, runner, runs, syncs
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
    assert proc.stderr.strip().splitlines()[-1].endswith("--stages: x: choose among a,b,o,d,e,c,f,g,s,v,m,y")
    assert not (tmp_path / "gpu_check.jsonl").exists()


def test_each_stage_is_on_disk_as_it_ends_and_a_failing_one_does_not_stop_the_rest(tmp_path, monkeypatch, capsys):
    def broken(args, report, state):
        raise RuntimeError("the device went away")

    def fine(args, report, state):
        # the previous stage's line is already in the file when the next stage starts
        assert [json.loads(x)["stage"] for x in (args.out / "gpu_check.jsonl").read_text().splitlines()] == ["env", "a"]
        report("b.step", True, {"median_ms": {"LAMB default": 1.5}}, "LAMB default 1.50 ms")

    monkeypatch.setitem(runner.STAGES, "a", broken)
    monkeypatch.setitem(runner.STAGES, "b", fine)
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


def runner_args(tmp_path, **kw) -> argparse.Namespace:
    data = tmp_path / "data"
    for seq in (128, 512):
        (data / f"seq{seq}").mkdir(parents=True, exist_ok=True)
        (data / f"seq{seq}" / "manifest.json").write_text("{}")  # present: no corpus is built
    return argparse.Namespace(**{"out": tmp_path / "out", "smoke": True, "data": data, "model": "bert-tiny",
                                 "micro": 8, "accum": 2, "steps": 10, "stage_timeout": 90, **kw})


def test_a_stage_past_its_budget_is_cut_with_its_processes_and_the_next_runs(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"

    def slow(args, report, state):  # a launch that would outlive the budget
        procs.run_group(["sh", "-c", f"echo $$ > {pid_file}; sleep 60"], tmp_path / "slow.log", dict(os.environ), 120)

    def fine(args, report, state):
        report("b.step", True, {"deadline_left": args.deadline - time.monotonic()}, "ran")

    monkeypatch.setitem(runner.STAGES, "a", slow)
    monkeypatch.setitem(runner.STAGES, "b", fine)
    t = time.monotonic()
    assert runner.run(runner_args(tmp_path, budget="a=2,b=30"), ["a", "b"]) == 1
    assert time.monotonic() - t < 20
    lines = [json.loads(x) for x in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["ok"]) for r in lines] == [("env", None), ("a", False), ("b.step", True)]
    assert lines[1]["cut"] is True and lines[1]["budget_s"] == 2.0
    assert 25 < lines[2]["deadline_left"] <= 30  # the next stage's own budget
    with pytest.raises(ProcessLookupError):  # the cut stage's launch is gone with it
        os.kill(int(pid_file.read_text()), 0)


def test_the_total_cuts_the_stage_it_reaches_and_starts_none_after(tmp_path, monkeypatch):
    monkeypatch.setitem(runner.STAGES, "a", lambda args, report, state: time.sleep(30))
    monkeypatch.setitem(runner.STAGES, "b", lambda args, report, state: report("b.step", True, {}, "ran"))
    monkeypatch.setattr(runner, "MIN_START_S", 1)
    assert runner.run(runner_args(tmp_path, total=3.0), ["a", "b"]) == 1
    lines = [json.loads(x) for x in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["ok"]) for r in lines] == [("env", None), ("a", False), ("b", False)]
    assert lines[1]["cut"] is True and 2 < lines[1]["budget_s"] <= 3
    assert lines[2]["not_started"] is True and lines[2]["left_s"] < 1


def test_budgets_follow_the_stage_timeout_and_apply_on_the_cpu_only_where_asked():
    gpu = runner.budgets(argparse.Namespace(smoke=False, stage_timeout=60, budget="m=200"))
    assert (gpu["a"], gpu["e"], gpu["c"], gpu["m"], gpu["y"]) == (60.0, 180.0, 330.0, 200.0, 120.0)
    cpu = runner.budgets(argparse.Namespace(smoke=True, stage_timeout=90, budget="y=400"))
    assert (cpu["a"], cpu["f"], cpu["c"], cpu["m"], cpu["y"]) == (90.0, 210.0, None, None, 400.0)
    for bad in ("m", "x=5", "m=0", "m=fast"):
        with pytest.raises(ValueError, match="expected LETTER=SECONDS"):
            runner.parse_budget(bad)
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--budget", "q=3"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--budget: 'q=3': expected LETTER=SECONDS" in proc.stderr


def test_stage_m_configs_are_the_shipped_phase_configs_at_the_checks_size(tmp_path):
    args = argparse.Namespace(accum=2, model="large", data=Path("/d"), device="cuda")
    p1 = json.loads(efficiency.phase_config(args, tmp_path, 128, micro=128, steps=20, log_every=4, name="a",
                                            compile="layers", packing="ffd").read_text())
    p2 = json.loads(efficiency.phase_config(args, tmp_path, 512, micro=32, steps=20, log_every=4, name="b",
                                            compile="off", packing="off").read_text())
    shipped2 = json.loads((REPO / "ds_configs" / "lamb_32k.json").read_text())
    assert (p1["train_batch_size"], p1["train_micro_batch_size_per_gpu"], p2["train_batch_size"]) == (256, 128, 64)
    assert p1["zero_optimization"] == p2["zero_optimization"] == {"stage": 2}
    assert p1["bf16"] == SHIPPED["bf16"] and p1["optimizer"] == SHIPPED["optimizer"]
    assert p2["optimizer"] == shipped2["optimizer"] and p2["scheduler"] == shipped2["scheduler"]
    assert (p1["pretrain"]["seq_len"], p1["pretrain"]["max_predictions"], p1["pretrain"]["data"]) == (128, 20, "/d/seq128")
    assert (p2["pretrain"]["seq_len"], p2["pretrain"]["max_predictions"], p2["pretrain"]["data"]) == (512, 80, "/d/seq512")
    assert "init_checkpoint" not in p2["pretrain"] and "output" not in p2["pretrain"]
    assert (p1["pretrain"]["compile"], p1["pretrain"]["packing"], p2["pretrain"]["compile"]) == ("layers", "ffd", "off")
    for p in (p1, p2):
        assert p["pretrain"]["validation_shards"] == 0 and p["pretrain"]["checkpoint_every"] == 0
        assert (p["pretrain"]["max_steps"], p["pretrain"]["log_every"], p["pretrain"]["model"]) == (20, 4, "large")
        assert not any(k.startswith("_comment") for k in p)
    from pretrain import config as config_mod  # run.py's own reading of it

    ds, cfg = config_mod.load(tmp_path / "b.json")
    assert (cfg.seq_len, cfg.max_steps, cfg.packing) == (512, 20, "off") and ds["scheduler"]["params"]["total_num_steps"] == 20


def write_records(run_dir: Path, recs: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_stage_m_figures_read_back_from_metrics(tmp_path):
    # records every 4 steps: the first holds the compilation, the rest the steady rate
    recs = [{"step": 4 * (i + 1), "loss": 9.0, "samples_per_s": sps, "tokens_per_s": 100 * sps, "mfu": m, "hfu": m + 0.1,
             "fill": 0.9, "data_wait": 0.01, "interval_s": t, "peak_mem_gib": mem, "compiled_graphs": g}
            for i, (sps, m, t, mem, g) in enumerate([(10.0, 0.05, 40.6, 20.0, 3), (400.0, 0.40, 0.8, 21.5, 4),
                                                       (420.0, 0.42, 0.84, 21.0, 4), (410.0, 0.41, 0.82, 21.0, 4)])]
    recs.insert(2, {"step": 8, "eval_mlm_loss": 7.0})  # not a training record
    write_records(tmp_path, recs)
    f = efficiency.figures(tmp_path)
    assert (f["samples_per_s"], f["tokens_per_s"], f["mfu"], f["fill"]) == (410.0, 41000.0, 0.41, 0.9)
    assert f["hfu"] == pytest.approx(0.51) and f["peak_mem_gib"] == 21.5 and f["steps_logged"] == 16
    assert f["step_s"] == pytest.approx(0.205) and f["first_step_s"] == pytest.approx(40.6 - 3 * 0.205)
    assert (f["compiled_graphs"], f["compiled_after_first_record"]) == (4, 1)
    write_records(tmp_path / "eager", [{k: v for k, v in r.items() if k != "compiled_graphs"} for r in recs])
    assert efficiency.figures(tmp_path / "eager")["compiled_graphs"] is None
    assert efficiency.figures(tmp_path / "none") == {}


def test_stage_m_combines_rounds_and_judges_the_goals_on_the_best_variant():
    r1 = {"samples_per_s": 1000.0, "tokens_per_s": 110_000.0, "mfu": 0.30, "first_step_s": 40.0, "peak_mem_gib": 20.0}
    r2 = {"samples_per_s": 1100.0, "tokens_per_s": 120_000.0, "mfu": 0.32, "first_step_s": 5.0, "peak_mem_gib": 21.0}
    both = efficiency.combine([r1, r2])
    assert (both["samples_per_s"], both["mfu"], both["peak_mem_gib"], both["rounds"]) == (1050.0, 0.31, 21.0, 2)
    assert (both["first_step_s"], both["first_step_s_warm"]) == (40.0, 5.0)
    assert both["round_spread"] == pytest.approx(100 / 1050)
    assert efficiency.combine([]) == {}
    fast = {"tokens_per_s": 190_000.0, "mfu": 0.46}
    g = efficiency.goals({128: {"eager/padded": both, "compiled/packed": fast}, 512: {"compiled/packed": {"mfu": 0.44}}})
    assert g["best_mfu_128"] == {"variant": "compiled/packed", "mfu": 0.46} and g["best_mfu_512"]["mfu"] == 0.44
    assert g["tokens_over_run5"] == pytest.approx(190_000 / 116_100) and g["tokens_goal_met"] is True
    assert g["mfu_goal_met"] is False  # seq 512 short of 45%
    assert efficiency.goals({128: {"x": fast}, 512: {"y": {"mfu": 0.45}}})["mfu_goal_met"] is True
    assert efficiency.goals({128: {"x": {"mfu": None}}})["mfu_goal_met"] is False


def test_stage_m_runs_round_two_only_where_the_budget_has_room(tmp_path, monkeypatch):
    launched, clock = [], [0.0]

    def fake_launch(args, cfg, run_dir, log, steps, timeout):
        clock[0] += 50.0
        c = json.loads(cfg.read_text())["pretrain"]
        launched.append((c["seq_len"], c["compile"], c["packing"], run_dir.name))
        write_records(run_dir, [{"step": s, "loss": 9.0, "samples_per_s": 100.0, "tokens_per_s": 9000.0, "interval_s": 1.0}
                                for s in range(2, steps + 1, 2)])
        return "done", 50.0, 3.0

    monkeypatch.setattr(efficiency, "launch_run", fake_launch)
    monkeypatch.setattr(efficiency.time, "monotonic", lambda: clock[0])
    args = runner_args(tmp_path, device="cpu", m_compile="layers", m_rounds=2, m_steps=6, m_log_every=2,
                       run_timeout=60)
    args.out.mkdir(parents=True)
    lines = []
    args.deadline = 470.0  # round 1: 8 x 50 s; then 70 s left, and a launch needs 50 x 1.2 + 10
    efficiency.stage_m(args, lambda stage, ok, rec, summary: lines.append((stage, ok, rec)), {})
    assert [x[:3] for x in launched[:4]] == [(128, "off", "off"), (128, "layers", "off"), (128, "off", "ffd"),
                                            (128, "layers", "ffd")]
    assert [x[0] for x in launched] == [128] * 4 + [512] * 4 + [128]  # round 2's first, then 20 s left
    rows = {stage: (ok, rec) for stage, ok, rec in lines}
    assert rows["m.128.eager.padded.r2"][1]["round"] == 2 and rows["m.128.compiled.padded.r2"][1]["skipped"] == "budget"
    assert rows["m.128.eager.padded.r1"][0] is None and rows["m.128.eager.padded.r1"][1]["to_first_record_s"] == 3.0
    assert rows["m.512.compiled.packed.r2"][1]["skipped"] == "budget"
    assert rows["m.128"][1]["variants"]["compiled/packed"]["samples_per_s"] == 100.0
    assert rows["m.128"][1]["variants"]["eager/padded"]["rounds"] == 2
    assert rows["m.128"][1]["variants"]["eager/padded"]["over_eager_padded"] == 1.0
    assert rows["m.goal"][0] is None  # judged on a GPU only


def test_the_noise_scale_cost_compares_measuring_and_plain_steps():
    recs = [{"step": s, "loss": 9.0, "interval_s": (5.0 if s <= 2 else 0.21 if s % 2 == 0 else 0.2)} for s in range(1, 11)]
    cost = syncs.gns_cost(recs)
    assert cost["measured_step_s"] == 0.21 and cost["plain_step_s"] == 0.2 and cost["steps"] == 8
    assert cost["share_at_10"] == pytest.approx(0.01 / 2.0)
    assert syncs.gns_cost(recs[:2]) == {}


def test_the_sync_watch_records_value_reads_only_while_armed_and_not_paused():
    import torch

    from bench.gpucheck import sync_worker

    watch = sync_worker.Watch(after=1, cuda=False)
    x = torch.ones(3)
    with sync_worker.Recorder(watch), sync_worker.ToList(watch):
        x.sum().item()                 # before the first step ended: not watched
        watch.step_ended()
        float(x.sum())                 # armed
        watch.pause()
        x.tolist()                     # inside log()/_read(): allowed
        watch.resume()
        torch.tensor([1.0, 2.0])       # a tensor from Python data
        x.tolist()
    assert [(e["what"], e["step"]) for e in watch.events] == [
        ("a tensor's value read (.item/bool/float/int)", 2), ("torch.tensor() of Python data", 2), (".tolist()", 2)]


def test_bench_mfu_is_run_py_count_with_the_old_one_beside_it():
    import torch

    from pretrain.flops import FlopRates
    from pretrain.model import bert_config

    cfg = bert_config("large", 30522)
    mask = torch.ones(2, 128, dtype=torch.long)
    mask[1, 100:] = 0
    labels = torch.full((2, 20), -1)
    labels[:, :15] = 7
    batch = {"input_ids": torch.zeros(2, 128, dtype=torch.long), "attention_mask": mask, "masked_lm_labels": labels}
    work = common.batches_work([batch, batch])
    assert work == {"tokens": 456.0, "pairs": 456.0 * 128, "masked": 60.0, "samples": 4, "positions": 512,
                    "pairs_executed": 512 * 128, "masked_slots": 80}
    got = common.mfu(cfg, work, 0.01, "NVIDIA H100 80GB HBM3")
    assert got["mfu"] == pytest.approx(FlopRates.of(cfg).model_flops(work) / 0.01 / 989e12)
    assert got["hfu"] == pytest.approx(FlopRates.of(cfg).executed_flops(work) / 0.01 / 989e12) and got["hfu"] > got["mfu"]
    assert common.mfu(cfg, work, 0.01, "Some New Accelerator") == {"mfu": None, "hfu": None}
    assert common.mfu_old_count(335_000_000, 1000 * 128, "NVIDIA H100 80GB HBM3") == pytest.approx(
        6 * 335e6 * 128e3 / 989e12)


def test_one_call_is_issue_28s_order_within_its_total(monkeypatch):
    from bench import gpu_check

    seen = []
    monkeypatch.setattr(runner, "run", lambda args, stages: seen.append((stages, args.total)) or 0)
    assert gpu_check.main(["--smoke", "--one-call"]) == 0
    assert gpu_check.main(["--smoke", "--one-call", "--total", "300"]) == 0
    assert seen == [(["m", "y", "b", "c", "o", "s"], 530.0), (["m", "y", "b", "c", "o", "s"], 300.0)]
