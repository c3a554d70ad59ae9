"""Predictions of steps and samples at other batch sizes from one run's noise scale, against the
model S(B) = S_min (1 + B_noise/B) computed independently here (scaling/predict.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaling import grid, plots, predict
from scaling.__main__ import main


def make_run(d: Path, batch: int, noise, steps: int = 300, every: int = 10, evals: bool = False) -> Path:
    """A run directory: loss falling linearly from 10 to 5 over ``steps``; noise(step) logged."""
    d.mkdir(parents=True)
    (d / "config.effective.json").write_text(json.dumps({"train_batch_size": batch}))
    lines = []
    for s in range(every, steps + 1, every):
        rec = {"step": s, "loss": 10 - 5 * s / steps}
        if noise is not None:
            rec |= {"gns_b_simple": noise(s), "gns_b_simple_err": 0.1 * noise(s)}
        lines.append(json.dumps(rec))
        if evals and s % 50 == 0:
            lines.append(json.dumps({"step": s, "eval_mlm_loss": 9 - 5 * s / steps}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_constant_noise_scale_follows_the_model(tmp_path):
    run = make_run(tmp_path / "r", batch=50, noise=lambda s: 100.0)
    p = predict.predict(run, [25, 50, 1000, 65536], target=5.0)
    assert p["run_steps"] == pytest.approx(300)
    s_min = 300 / (1 + 100 / 50)
    assert p["s_min"] == pytest.approx(s_min)
    for b in p["batches"]:
        assert b["steps"] == pytest.approx(s_min * (1 + 100 / b["batch"]))
        assert b["samples"] == pytest.approx(b["steps"] * b["batch"])
    big = p["batches"][2]  # batch 1000, noise scale 10% lower and higher
    assert sorted((big["steps_low_noise"], big["steps_high_noise"])) == pytest.approx(
        sorted((300 * (1 + 90 / 1000) / (1 + 90 / 50), 300 * (1 + 110 / 1000) / (1 + 110 / 50))))


def test_an_error_bar_wider_than_the_noise_scale_keeps_the_band_positive(tmp_path):
    run = make_run(tmp_path / "r", batch=32, noise=lambda s: 100.0)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        rec["gns_b_simple_err"] = 150.0  # ±150%: seen at batch 32, two micro-batches per step
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    p = predict.predict(run, [32, 1024], target=5.0)
    big = p["batches"][1]
    # low end: no noise at all, so no gain from a larger batch (the run's own 300 steps)
    assert big["steps_low_noise"] == pytest.approx(300)
    assert big["steps_high_noise"] == pytest.approx(300 * (1 + 250 / 1024) / (1 + 250 / 32))
    assert 0 < big["steps_high_noise"] < big["steps"] < big["steps_low_noise"]


def test_a_growing_noise_scale_is_integrated_over_the_run(tmp_path):
    noise = lambda s: 20.0 + 2.0 * s  # noqa: E731 - grows as the loss falls, as in real runs
    run = make_run(tmp_path / "r", batch=64, noise=noise)
    p = predict.predict(run, [16, 2048], target=7.5)  # reached half way, at step 150
    t = np.arange(150) + 0.5
    bn = np.interp(t, np.arange(10, 301, 10), noise(np.arange(10, 301, 10)))
    for b in p["batches"]:
        want = np.sum((1 + bn / b["batch"]) / (1 + bn / 64))
        assert b["steps"] == pytest.approx(want, rel=1e-9)
    assert p["noise_scale_at_target"] == pytest.approx(noise(150))


def test_cli_writes_the_prediction_and_names_bad_runs(tmp_path, capsys):
    run = make_run(tmp_path / "r", batch=128, noise=lambda s: 500.0, evals=True)
    assert main(["predict", str(run), "--batch-sizes", "128,32768,65536"]) == 0
    out = capsys.readouterr().out
    p = json.loads((run / "prediction.json").read_text())
    assert p["loss"] == "eval_mlm_loss" and p["target_loss"] == pytest.approx(4.0)  # the held-out loss it reached
    assert [b["batch"] for b in p["batches"]] == [128, 32768, 65536] and "65536" in out
    assert (run / "prediction.png").stat().st_size > 0
    silent = make_run(tmp_path / "no_gns", batch=128, noise=None)
    assert main(["predict", str(silent)]) == 2
    assert "no gradient noise scale in metrics.jsonl" in capsys.readouterr().err
    assert main(["predict", str(run), "--target-loss", "1.0"]) == 2
    assert "never reached eval_mlm_loss 1.0000" in capsys.readouterr().err


def test_overlay_on_a_scaling_study(tmp_path):
    run = make_run(tmp_path / "r", batch=64, noise=lambda s: 200.0, evals=True)
    grid_dir = tmp_path / "grid"
    grid_dir.mkdir()
    results = [{"name": f"lamb_b{b}_lrx1", "optimizer": "lamb", "batch": b, "lr": 1e-3, "lr_multiplier": 1.0,
                "steps": 100, "final_loss": 6.0, "steps_to_target": 300 * 64 / b, "exit_code": 0, "wall_s": 1.0,
                "evals": [{"samples": 1000, "step": 10, "eval_mlm_loss": 6.0}]} for b in (64, 256)]
    (grid_dir / "results.json").write_text(json.dumps(results))
    (grid_dir / "summary.json").write_text(json.dumps({"target_loss": 5.0}))
    assert main(["predict", str(run), "--output", str(grid_dir), "--batch-sizes", "1024"]) == 0
    p = json.loads((run / "prediction.json").read_text())
    assert p["target_loss"] == 5.0 and {b["batch"] for b in p["batches"]} == {64, 256, 1024}
    assert (grid_dir / "scaling.png").stat().st_size > 0


def test_the_study_keeps_the_overlay_as_runs_are_added(tmp_path, monkeypatch):
    """The grid rewrites its plots after every run: the prediction kept in a run dir (for the same
    target) stays on them, and no temporary file is left beside the outputs."""
    grid_dir = tmp_path / "grid"
    (grid_dir / "lamb_b64_lrx1").mkdir(parents=True)
    results = [{"name": f"lamb_b{b}_lrx1", "optimizer": "lamb", "batch": b, "lr": 1e-3, "lr_multiplier": 1.0,
                "steps": 100, "final_loss": 6.0, "steps_to_target": 300 * 64 / b,
                "samples_to_target": 300 * 64, "exit_code": 0, "wall_s": 1.0,
                "evals": [{"samples": 1000, "step": 10, "eval_mlm_loss": 6.0, "eval_mlm_acc": 0.1,
                           "eval_nsp_acc": 0.5}]} for b in (64, 256)]
    p = {"target_loss": 5.0, "run": str(grid_dir / "lamb_b64_lrx1"),
         "batches": [{"batch": b, "steps": 300 * (1 + 100 / b), "steps_low_noise": 290, "steps_high_noise": 320}
                     for b in (64, 256)]}
    (grid_dir / "lamb_b64_lrx1" / "prediction.json").write_text(json.dumps(p))
    assert grid.overlay_prediction(results, grid_dir, 5.0) == p
    assert grid.overlay_prediction(results, grid_dir, 6.0) is None  # another target: not this study's
    grid.write_outputs(results, grid_dir, 5.0)
    assert (grid_dir / "scaling.png").stat().st_size > 0 and (grid_dir / "results.csv").read_text().count("\n") == 3
    drawn = []
    monkeypatch.setattr(plots, "plot_grid", lambda *a, prediction=None, **k: drawn.append(prediction))
    grid.write_outputs(results, grid_dir, 5.0)
    assert drawn == [p]
    assert not [f for f in grid_dir.iterdir() if ".tmp" in f.name]
    table = (grid_dir / "comparison.md").read_text().splitlines()
    assert "| 64 | ×1 of 1: 6.000, 300 steps | 769 (290–320) |" in table  # 300 (1 + 100/64) = 768.75
    assert "| 256 | ×1 of 1: 6.000, 75 steps | 417 (290–320) |" in table
