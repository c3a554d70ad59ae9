"""python -m scaling confirm: fresh seeds at a study's best lrs, and steps to a
training-loss target read from the training records (no training launched: run.py's records are
covered by test_pretrain_e2e)."""
from __future__ import annotations

import json
import math
import random

import pytest

from optim.schedules import scale_lr
from scaling import confirm, grid, targets
from scaling.__main__ import main


def write_records(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_training_records_stand_at_the_middle_of_their_interval(tmp_path):
    write_records(tmp_path, [{"step": 10, "loss": 9.0, "mlm_loss": 8.0}, {"step": 10, "eval_mlm_loss": 7.0},
                             {"step": 30, "loss": 7.0, "mlm_loss": 6.0}, {"step": 40, "loss": 6.0},
                             {"step": 50, "loss": 5.0, "mlm_loss": 4.5, "epoch": 1}])
    curve = targets.train_curve(tmp_path, batch=8)
    # the record at step 30 averages the losses of steps 11..30, taken after 10..29 updates: it
    # stands at 19.5 batches (156 samples) and covers 20 (160 samples); the second epoch's record
    # (samples seen before) is left out, as is the record without an MLM loss
    assert curve == [{"step": 10, "samples": 36, "width": 80, "mlm_loss": 8.0},
                     {"step": 30, "samples": 156, "width": 160, "mlm_loss": 6.0}]
    assert targets.train_curve(tmp_path / "nothing", 8) == []


def test_crossing_is_interpolated_and_smoothing_weighs_by_samples():
    curve = [{"samples": s, "width": w, "mlm_loss": y} for s, w, y in
             ((50, 100, 7.0), (150, 100, 6.0), (300, 200, 5.0), (500, 200, 4.0))]
    # no neighbours within the window: 5.5 halfway between 150 and 300 samples
    assert targets.samples_to_target(curve, 5.5, window=10) == pytest.approx(225)
    assert targets.samples_to_target(curve, 3.0, window=10) is None
    assert targets.samples_to_target(curve, 7.5, window=10) == 50  # the first record already below
    # window 300: each record weighs by the samples its interval shares with the window. Records
    # cover [0,100], [100,200], [200,400], [400,600]. Around 50 ([-100,200]): 100 of the first two
    # -> 6.5; around 150 ([0,300]): 100 of each of the first three -> 6.0; around 300 ([150,450]):
    # 50, 200, 50 -> (300 + 1000 + 200) / 300 = 5.0; around 500 ([350,650]): 50, 200 -> 4.2
    ys = targets.smoothed(curve, window=300)
    assert ys == pytest.approx([6.5, 6.0, 5.0, 4.2])
    assert targets.samples_to_target(curve, 5.5, window=300) == pytest.approx(225)


def test_smoothing_reads_a_noisy_curve_near_its_true_crossing():
    """A loss falling as 6 + 3·exp(-s/20k) crosses 6.3 at s = 20k·ln 10 ≈ 46,052 samples, with a
    slope of 1.5e-5 per sample there. Records every 1,600 samples with noise of sd 0.05 (2.5 times
    what 16k masked tokens give) put the first raw crossing off by ~3,300 samples (0.05 / slope);
    the 8,192-sample window averages ~5 records: ~1,500 samples (~3%) expected, 10% at worst."""
    rng = random.Random(0)
    truth = 20000 * math.log(10)
    raw_errors, smooth_errors = [], []
    for _ in range(20):
        curve = [{"samples": s, "width": 1600, "mlm_loss": 6 + 3 * math.exp(-s / 20000) + rng.gauss(0, 0.05)}
                 for s in range(800, 200000, 1600)]
        raw_errors.append(abs(targets.samples_to_target(curve, 6.3, window=1) - truth) / truth)
        smooth_errors.append(abs(targets.samples_to_target(curve, 6.3, window=8192) - truth) / truth)
    assert max(smooth_errors) < 0.10 and sum(smooth_errors) / 20 < 0.03
    assert sum(smooth_errors) < 0.6 * sum(raw_errors)


def test_critical_batch_fit_recovers_the_model_and_refuses_what_does_not_scale():
    exact = [(b, 500 * (1 + 100 / b)) for b in (32, 64, 128, 256, 512, 1024)]
    fit = confirm.fit_critical_batch(exact)
    assert fit["s_min"] == pytest.approx(500) and fit["b_crit"] == pytest.approx(100)
    assert fit["max_rel_residual"] == pytest.approx(0, abs=1e-9)
    rng = random.Random(1)  # ±5% noise on each point: the fit stays within 15%
    noisy = confirm.fit_critical_batch([(b, s * (1 + rng.uniform(-0.05, 0.05))) for b, s in exact])
    assert noisy["b_crit"] == pytest.approx(100, rel=0.15) and noisy["max_rel_residual"] < 0.1
    assert confirm.fit_critical_batch(exact[:2]) is None  # two batches fit any curve
    flat = confirm.fit_critical_batch([(b, 300.0) for b in (64, 256, 1024)])
    assert flat["b_crit"] is None and flat["note"] == "steps did not fall with the batch"
    faster = confirm.fit_critical_batch([(64, 1000.0), (256, 200.0), (1024, 40.0)])  # better than linear
    assert faster["b_crit"] is None and "above the largest batch" in faster["note"]
    assert confirm.fit_critical_batch([(64, 100.0), (256, None), (1024, 50.0)]) is None  # a batch missed it


def grid_result(opt, batch, mult, final, seed=0, lr_base=None):
    lr = scale_lr(lr_base or {"lamb": 5e-3, "adamw": 1.5e-3}[opt], 64, batch, "sqrt") * mult
    name = f"{opt}_b{batch}_lrx{mult:g}" + (f"_s{seed}" if seed else "")
    return {"optimizer": opt, "batch": batch, "lr": lr, "lr_multiplier": mult, "steps": 4096 // batch,
            "micro_batch": 64, "seed_offset": seed, "name": name, "exit_code": 0, "wall_s": 1.0,
            "final_loss": final, "steps_to_target": None,
            "evals": [{"step": 4096 // batch, "samples": 4096, "eval_mlm_loss": final, "eval_mlm_acc": 0.1,
                       "eval_nsp_acc": 0.5}]}


def write_grid(grid_dir):
    grid_dir.mkdir()
    results = [grid_result("lamb", 64, 1, 6.2), grid_result("lamb", 64, 3, 6.0), grid_result("lamb", 64, 3, 5.9, seed=1),
               grid_result("lamb", 256, 1, 6.3), grid_result("lamb", 256, 3, 6.4),
               grid_result("adamw", 256, 0.333333, 6.5), grid_result("adamw", 256, 1, 6.6)]
    (grid_dir / "results.json").write_text(json.dumps(results))


ARGS = ["--config", "c.json", "--data", "d", "--batch-sizes", "64,256", "--optimizers", "lamb,adamw",
        "--samples", "4096", "--base-batch", "64", "--lr", "lamb=5e-3,adamw=1.5e-3", "--np", "1"]


def test_confirm_runs_each_best_lr_with_fresh_seeds_and_summarises_them(tmp_path, monkeypatch, capsys):
    write_grid(tmp_path / "grid")
    out = tmp_path / "confirm"
    launched = []

    def fake_run(cmd, stdout, stderr, env):
        run_dir = __import__("pathlib").Path(cmd[cmd.index("--output") + 1])
        seed = int(cmd[cmd.index("--seed") + 1])
        batch = int(cmd[cmd.index("--train-batch-size") + 1])
        launched.append((run_dir.name, seed, cmd[cmd.index("--max-steps") + 1]))
        assert f"pretrain.log_every={grid.log_every(4096 // batch)}" in cmd
        # a loss that falls with samples; the second seed a little slower
        recs = []
        for step in range(1, 4096 // batch + 1):
            recs.append({"step": step, "loss": 7.0, "mlm_loss": 7.0 - 2.0 * step * batch / 4096 + 0.1 * (seed - 43),
                         "gns_b_simple": 64.0, "gns_b_simple_err": 6.4})
        recs.append({"step": 4096 // batch, "eval_mlm_loss": 5.5 + 0.01 * seed, "eval_mlm_acc": 0.1,
                     "eval_nsp_acc": 0.5})
        write_records(run_dir, recs)
        (run_dir / "config.effective.json").write_text(json.dumps({"train_batch_size": batch}))

        class P:
            returncode = 0
        return P()

    monkeypatch.setattr(grid, "run_process", fake_run)
    rc = main(["confirm"] + ARGS + ["--output", str(out), "--grid", str(tmp_path / "grid"), "--seeds", "1,2",
                              "--train-target", "6.0", "--train-window", "1", "--seed", "42"])
    assert rc == 0, capsys.readouterr().err
    # best by final loss on the study's seed: lamb x3 at 64 (the seed-1 repeat is no candidate),
    # lamb x1 at 256, adamw x1/3 at 256; largest batch first, seeds in order, optimizers side by side
    assert launched == [("lamb_b256_lrx1_s1", 43, "16"), ("adamw_b256_lrx0.333333_s1", 43, "16"),
                        ("lamb_b256_lrx1_s2", 44, "16"), ("adamw_b256_lrx0.333333_s2", 44, "16"),
                        ("lamb_b64_lrx3_s1", 43, "64"), ("lamb_b64_lrx3_s2", 44, "64")]
    seeds = json.loads((out / "seeds.json").read_text())
    rows = {(r["optimizer"], r["batch"]): r for r in seeds["rows"]}
    lamb64 = rows[("lamb", 64)]
    assert lamb64["seeds"] == [1, 2] and lamb64["pick"]["final_loss"] == 6.0
    assert lamb64["final_loss"]["values"] == pytest.approx([5.93, 5.94])
    # 7 - step/32 (+0.1 for seed 2) reaches 6.0 in the record of step 32 (35.2 for seed 2, between the
    # records of 35 and 36); step k's loss is that of the weights after k - 1 updates: 31 and 34.2
    assert lamb64["train_steps_to_target"]["6"]["values"] == pytest.approx([31, 34.2])
    assert lamb64["train_steps_to_target"]["6"]["mean"] == pytest.approx(32.6)
    # a constant noise scale of 64: S(B) = S(64)·(1 + 64/B) / (1 + 64/64), so 5/8 of the steps at 256,
    # from each seed at 64, averaged (McCandlish et al.'s model, with the run's own steps)
    pred = seeds["predicted"]["6"]["lamb"]
    assert pred["from"] == ["lamb_b64_lrx3_s1", "lamb_b64_lrx3_s2"] and pred["batch"] == 64
    at256 = next(b for b in pred["batches"] if b["batch"] == 256)
    assert at256["steps"] == pytest.approx((31 + 34.2) / 2 * 5 / 8)
    # the band: the noise scale ±10% (its error); a larger one leaves fewer steps at the larger batch
    assert at256["low"] == pytest.approx(31 * (1 + 1.1 * 64 / 256) / (1 + 1.1))
    assert at256["high"] == pytest.approx(34.2 * (1 + 0.9 * 64 / 256) / (1 + 0.9))
    # AdamW ran at 256 only: predicted from there (7 and 7.8 steps to 6.0), more steps at 64
    adamw = seeds["predicted"]["6"]["adamw"]
    assert adamw["batch"] == 256 and adamw["batches"][0]["batch"] == 64
    assert adamw["batches"][0]["steps"] == pytest.approx((7 + 7.8) / 2 * (1 + 1) / (1 + 64 / 256))
    crit = {(c["train_target"], c["optimizer"]): c for c in seeds["critical_batch"]}
    assert crit[(6.0, "lamb")]["fit"] is None  # two batches only
    assert crit[(6.0, "lamb")]["noise_scale_at_target"] == pytest.approx(64)
    table = (out / "seeds.md").read_text()
    assert "| 256 | adamw |" in table and "6.500, –" in table  # the pick, which never reached 6.2
    assert "| 64 | lamb | 0.015 (×3) | **5.935** (5.930, 5.940) | –, – | **33** (31, 34) (the prediction's input) |" \
        in table
    assert "| 256 | lamb | 0.01 (×1) | **5.935** (5.930, 5.940) | –, – | **7** (7, 8) → 20 (" in table
    assert (out / "seeds.png").stat().st_size > 0
    # rerun: nothing trains again, same summary
    monkeypatch.setattr(grid, "run_process", lambda *a, **k: pytest.fail("re-ran a finished run"))
    assert main(["confirm"] + ARGS + ["--output", str(out), "--grid", str(tmp_path / "grid"), "--seeds", "1,2",
                                "--train-target", "6.0", "--train-window", "1", "--summarize"]) == 0
    assert json.loads((out / "seeds.json").read_text())["rows"] == seeds["rows"]
    # another target and window: read again from the records, nothing of the first kept
    assert main(["confirm"] + ARGS + ["--output", str(out), "--grid", str(tmp_path / "grid"), "--seeds", "1,2",
                                "--train-target", "6.5", "--train-window", "640", "--summarize"]) == 0
    again = {(r["optimizer"], r["batch"]): r for r in json.loads((out / "seeds.json").read_text())["rows"]}
    assert set(again[("lamb", 64)]["train_steps_to_target"]) == {"6.5"}
    # 7 - step/32 is linear: a centred window leaves it as is, 6.5 at step 16 -> 15 (seed 1)
    assert again[("lamb", 64)]["train_steps_to_target"]["6.5"]["values"][0] == pytest.approx(15)
    stored = json.loads((out / "summary.json").read_text())["runs"]
    assert all(set(r["train_steps_to_target"]) == {"6.5"} for r in stored)


def test_a_diverged_seed_and_one_that_missed_the_target_stay_out_of_the_fit(tmp_path):
    def result(batch, seed, steps, final=6.0):
        return {"optimizer": "lamb", "batch": batch, "lr": 1e-2, "lr_multiplier": 1.0, "seed_offset": seed,
                "name": f"lamb_b{batch}_lrx1_s{seed}", "final_loss": final, "steps_to_target": None,
                "train_steps_to_target": {"6.3": steps}}

    results = [result(64, 1, 400.0), result(64, 2, 420.0), result(128, 1, 220.0), result(128, 2, 240.0, math.nan),
               result(256, 1, 130.0), result(256, 2, None), result(512, 1, 80.0), result(512, 2, 90.0)]
    rows = confirm.write_confirm_outputs(results, [], tmp_path, 6.2, [6.3], 8192.0)
    by = {r["batch"]: r for r in rows}
    assert by[128]["final_loss"]["mean"] == 6.0 and by[128]["final_loss"]["missing"] == 1  # the NaN
    assert by[256]["train_steps_to_target"]["6.3"]["missing"] == 1
    crit = json.loads((tmp_path / "seeds.json").read_text())["critical_batch"][0]
    assert crit["fit"]["batches"] == [64, 128, 512]  # 256: one seed never reached 6.3
    want = confirm.fit_critical_batch([(64, 410.0), (128, 230.0), (512, 85.0)])
    assert crit["fit"]["b_crit"] == pytest.approx(want["b_crit"])
    assert "| 256 | lamb | 0.01 (×1) | **6.000** (6.000, 6.000) | –, – | **130** (130, –) |" in \
        (tmp_path / "seeds.md").read_text()


def test_confirm_refuses_a_missing_study_and_other_lr_settings_in_one_line(tmp_path, capsys):
    rc = main(["confirm"] + ARGS + ["--output", str(tmp_path / "c"), "--grid", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope/results.json not found" in err and "Traceback" not in err
    write_grid(tmp_path / "grid")
    rc = main(["confirm"] + [a if a != "lamb=5e-3,adamw=1.5e-3" else "lamb=6e-3,adamw=1.5e-3" for a in ARGS]
                      + ["--output", str(tmp_path / "c"), "--grid", str(tmp_path / "grid")])
    err = capsys.readouterr().err
    assert rc == 2 and "pass the study's --lr" in err and "lamb_b64_lrx3" in err
    assert not (tmp_path / "c").exists()  # refused before any output
    with pytest.raises(SystemExit) as exc:
        main(["confirm"] + ARGS + ["--output", str(tmp_path / "c"), "--grid", str(tmp_path / "grid"), "--seeds", "0,1"])
    assert exc.value.code == 2 and "0 is the study's own seed" in capsys.readouterr().err


def test_confirm_under_another_schedule_says_so_and_trains_with_it(tmp_path, monkeypatch):
    """confirm with --power 0: the study's best lrs rerun at a constant rate after warmup; the
    tables name that schedule and warn that the pick (which decayed) compares schedules, not seeds."""
    write_grid(tmp_path / "grid")
    (tmp_path / "grid" / "lamb_b64_lrx3").mkdir()
    (tmp_path / "grid" / "lamb_b64_lrx3" / "config.effective.json").write_text(json.dumps(
        {"scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_proportion": 0.1, "power": 0.5}}}))
    schedules = []

    def fake_run(cmd, stdout, stderr, env):
        run_dir = __import__("pathlib").Path(cmd[cmd.index("--output") + 1])
        schedules.append(json.loads(next(a for a in cmd if a.startswith("scheduler="))[len("scheduler="):]))
        write_records(run_dir, [{"step": 4, "eval_mlm_loss": 6.0, "eval_mlm_acc": 0.1, "eval_nsp_acc": 0.5}])

        class P:
            returncode = 0
        return P()

    monkeypatch.setattr(grid, "run_process", fake_run)
    out = tmp_path / "constant"
    assert main(["confirm"] + ARGS + ["--output", str(out), "--grid", str(tmp_path / "grid"), "--seeds", "1",
                                "--power", "0", "--warmup", "0.2"]) == 0
    assert len(schedules) == 3 and all(s["params"] == {"warmup_proportion": 0.2, "power": 0.0} for s in schedules)
    first = (out / "seeds.md").read_text().splitlines()[0]
    assert first.startswith("Learning rate: linear warmup over 20% of each run's steps, then constant.")
    assert "pick decayed with power 0.5" in first
    assert json.loads((out / "seeds.json").read_text())["schedule"] == first
    # the study's own schedule: named, no warning
    assert confirm.schedule_note(0.1, 0.5, 0.5) == \
        "Learning rate: linear warmup over 10% of each run's steps, then (1 − t/T)^0.5 to zero at the run's end."
