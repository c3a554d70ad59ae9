"""python -m scaling grid: the run plan (same samples, scaled lr, lr search at the ends), resumability,
and the outputs it writes, without launching training (run.py is covered by test_pretrain_e2e)."""
from __future__ import annotations

import json
import math

import pytest

from scaling import grid
from scaling.__main__ import main
from scaling.targets import with_target


def make_args(tmp_path, rule="sqrt"):
    import argparse

    return argparse.Namespace(batch_sizes=[128, 512, 2048], optimizers=["lamb", "adamw"], samples=8192,
                              base_batch=128, lr={"lamb": 4e-3, "adamw": 1e-3}, lr_rule=rule,
                              lr_multipliers=[0.5, 1.0, 2.0], np=2, micro_batch=96, target_loss=4.5)


def test_plan_same_samples_scaled_lr_and_search_at_the_ends(tmp_path):
    specs = grid.plan(make_args(tmp_path))
    by = {(s.optimizer, s.batch, s.lr_multiplier): s for s in specs}
    assert len(specs) == 2 * (3 + 1 + 3)  # lr search at 128 and 2048 only
    for s in specs:
        assert s.steps * s.batch == 8192
        per_rank = s.batch // 2
        assert per_rank % s.micro_batch == 0 and s.micro_batch <= 96
    assert by[("lamb", 512, 1.0)].lr == pytest.approx(4e-3 * math.sqrt(4))
    assert by[("lamb", 2048, 2.0)].lr == pytest.approx(4e-3 * 4 * 2)
    assert ("adamw", 512, 2.0) not in by
    linear = grid.plan(make_args(tmp_path, "linear"))
    assert [s for s in linear if s.batch == 2048 and s.lr_multiplier == 1.0][0].lr == pytest.approx(4e-3 * 16)


def test_finished_run_is_not_run_again_and_a_new_target_is_recomputed(tmp_path, monkeypatch):
    spec = grid.RunSpec("lamb", 128, 4e-3, 1.0, 64, 64)
    (tmp_path / spec.name).mkdir()
    evals = [{"step": s, "samples": s * 128, "eval_mlm_loss": loss} for s, loss in ((32, 6.0), (64, 5.0))]
    stored = {"name": spec.name, "batch": 128, "final_loss": 5.0, "evals": evals, "steps_to_target": None}
    (tmp_path / spec.name / "result.json").write_text(json.dumps(stored))
    monkeypatch.setattr(grid, "run_process", lambda *a, **k: pytest.fail("re-ran a finished run"))
    args = make_args(tmp_path)
    r = grid.run_one(spec, args, tmp_path)
    assert r["final_loss"] == 5.0 and r["evals"] == evals and r["steps_to_target"] is None
    args.target_loss = 6.5
    r = grid.run_one(spec, args, tmp_path)
    # 6.5 is already met by the first evaluation, which then counts as is ...
    assert r["steps_to_target"] == 32 and r["samples_to_target"] == 32 * 128
    args.target_loss = 5.5  # ... and halfway between 6.0 (step 32) and 5.0 (step 64): step 48
    r = grid.run_one(spec, args, tmp_path)
    assert r["steps_to_target"] == pytest.approx(48) and r["samples_to_target"] == pytest.approx(48 * 128)


def test_parallel_runs_get_their_own_ports_and_a_share_of_the_threads(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, stdout, stderr, env):
        seen.append((env["MASTER_PORT"], env.get("OMP_NUM_THREADS")))

        class P:
            returncode = 1  # not a result: nothing stored
        return P()

    monkeypatch.setattr(grid, "run_process", fake_run)
    monkeypatch.setattr(grid, "cpu_count", lambda: 4)
    args = make_args(tmp_path)
    for k, v in dict(eval_points=4, eval_samples=64, warmup=0.1, power=0.5, seed=1, master_port=29700,
                     config="c.json", data="d", parallel=2, np=1).items():
        setattr(args, k, v)
    grid.run_one(grid.RunSpec("lamb", 128, 4e-3, 1.0, 64, 64), args, tmp_path, slot=1)
    grid.run_one(grid.RunSpec("lamb", 512, 4e-3, 1.0, 16, 64), args, tmp_path, slot=0)
    assert seen == [("29701", "2"), ("29700", "2")]
    assert not (tmp_path / "lamb_b128_lrx1" / "result.json").exists()


def test_results_steps_to_target_and_plots(tmp_path, monkeypatch):
    spec = grid.RunSpec("lamb", 128, 4e-3, 1.0, 64, 64)
    run_dir = tmp_path / spec.name

    def fake_run(cmd, stdout, stderr, env):
        assert "--train-batch-size" in cmd and cmd[cmd.index("--max-steps") + 1] == "64"
        assert any(c.startswith("optimizer=") and '"Lamb"' in c for c in cmd)
        lines = [{"step": s, "eval_mlm_loss": loss, "eval_mlm_acc": 0.1, "eval_nsp_acc": 0.5}
                 for s, loss in ((16, 6.0), (32, 4.8), (48, 4.4), (64, 4.1))]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))

        class P:
            returncode = 0
        return P()

    monkeypatch.setattr(grid, "run_process", fake_run)
    args = make_args(tmp_path)
    for k, v in dict(eval_points=4, eval_samples=64, warmup=0.1, power=0.5, seed=1, master_port=1,
                     config="c.json", data="d", target_loss=4.5).items():
        setattr(args, k, v)
    r = grid.run_one(spec, args, tmp_path)
    # 4.5 is reached between step 32 (4.8) and 48 (4.4), three quarters of the way
    assert r["steps_to_target"] == pytest.approx(44) and r["samples_to_target"] == pytest.approx(44 * 128)
    assert r["final_loss"] == 4.1
    grid.write_outputs([r], tmp_path, 4.5)
    assert (tmp_path / "results.csv").read_text().count("\n") == 5
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][0]["steps_to_target"] == pytest.approx(44)
    assert (tmp_path / "loss_vs_samples.png").stat().st_size > 0 and (tmp_path / "scaling.png").is_file()


def fake_result(opt, batch, lr, losses_by_samples, target=4.5):
    evals = [{"step": n // batch, "samples": n, "eval_mlm_loss": loss, "eval_mlm_acc": 0.1, "eval_nsp_acc": 0.5}
             for n, loss in losses_by_samples]
    r = {"optimizer": opt, "batch": batch, "lr": lr, "evals": evals, "final_loss": evals[-1]["eval_mlm_loss"]}
    return with_target(r, target)


def test_scaling_summary_takes_the_fastest_lr_and_compares_samples_with_the_smallest_batch():
    results = [
        fake_result("lamb", 64, 1e-3, [(1000, 5.0), (2000, 4.0)]),     # 4.5 at 1500 samples
        fake_result("lamb", 64, 3e-3, [(1000, 4.6), (2000, 4.2)]),     # 4.5 at 1250: the faster lr
        fake_result("lamb", 1024, 4e-3, [(2048, 5.5), (4096, 4.5)]),   # 4.5 at 4096 samples
        fake_result("lamb", 1024, 1e-2, [(2048, 6.0), (4096, 5.0)]),   # never
        fake_result("adamw", 64, 1e-3, [(1000, 4.0)]),
        fake_result("adamw", 1024, 1e-3, [(4096, 6.0)]),
    ]
    s = grid.scaling_summary(results)
    lamb = {row["batch"]: row for row in s["lamb"]}
    assert lamb[64]["lr"] == 3e-3 and lamb[64]["samples_to_target"] == pytest.approx(1250)
    assert lamb[1024]["lr"] == 4e-3 and lamb[1024]["steps_to_target"] == pytest.approx(4)
    assert lamb[1024]["samples_vs_smallest_batch"] == pytest.approx(4096 / 1250)
    adamw = {row["batch"]: row for row in s["adamw"]}
    assert adamw[1024]["steps_to_target"] is None and adamw[1024]["samples_vs_smallest_batch"] is None


def test_summarize_trains_nothing_and_reports_the_finished_runs(tmp_path, monkeypatch, capsys):
    spec = grid.RunSpec("lamb", 128, 4e-3, 1.0, 64, 64)
    (tmp_path / spec.name).mkdir()
    done = fake_result("lamb", 128, 4e-3, [(4096, 5.0), (8192, 4.0)])
    done.update(name=spec.name, steps=64, lr_multiplier=1.0, exit_code=0, wall_s=1.0)
    (tmp_path / spec.name / "result.json").write_text(json.dumps(done))
    monkeypatch.setattr(grid, "run_process", lambda *a, **k: pytest.fail("--summarize trained"))
    rc = main(["grid", "--config", "c.json", "--data", "d", "--output", str(tmp_path), "--batch-sizes", "128,2048",
                       "--optimizers", "lamb", "--samples", "8192", "--base-batch", "128", "--lr", "lamb=4e-3",
                       "--np", "1", "--summarize"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "1 planned runs not finished: lamb_b2048_lrx1" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == [spec.name]
    assert summary["runs"][0]["steps_to_target"] == pytest.approx(48)  # 4.5 halfway from 4096 to 8192


def test_runs_are_ordered_so_an_early_stop_keeps_the_telling_ones():
    import argparse

    args = argparse.Namespace(batch_sizes=[64, 256, 1024, 2048], optimizers=["lamb", "adamw"], samples=131072,
                              base_batch=64, lr={"lamb": 1e-2, "adamw": 1e-3}, lr_rule="sqrt",
                              lr_multipliers=[0.5, 1.0, 2.0], np=1, micro_batch=256)
    specs = grid.plan(args)
    order = [s.name for s in sorted(specs, key=lambda s: grid.run_priority(s, specs, args.optimizers))]
    assert order[:6] == ["lamb_b64_lrx1", "adamw_b64_lrx1", "lamb_b256_lrx1", "adamw_b256_lrx1",
                         "lamb_b2048_lrx1", "adamw_b2048_lrx1"]
    assert set(order[6:10]) == {f"{o}_b2048_lrx{m}" for o in ("lamb", "adamw") for m in ("0.5", "2")}
    assert order[-2:] == ["lamb_b64_lrx0.5", "adamw_b64_lrx0.5"]


def test_plan_searches_lr_at_every_batch_where_asked_and_runs_ends_only_optimizers_at_the_ends(tmp_path):
    args = make_args(tmp_path)
    args.batch_sizes, args.optimizers = [64, 256, 1024], ["lamb", "adamw", "lars"]
    args.lr = {"lamb": 1e-3, "adamw": 1e-3, "lars": 1.0}
    args.lr_multipliers, args.search_all, args.ends_only = [0.5, 1.0, 2.0], ["lamb", "adamw"], ["lars"]
    args.samples, args.base_batch, args.lr_rule, args.np, args.micro_batch = 4096, 64, "sqrt", 1, 64
    specs = grid.plan(args)
    by = {(s.optimizer, s.batch): sorted(x.lr_multiplier for x in specs if (x.optimizer, x.batch) == (s.optimizer, s.batch))
          for s in specs}
    assert by[("lamb", 256)] == by[("adamw", 256)] == [0.5, 1.0, 2.0]
    assert ("lars", 256) not in by and by[("lars", 64)] == by[("lars", 1024)] == [0.5, 1.0, 2.0]
    # the search at the middle batches runs after every scaled-lr run, largest batch first, and
    # the lower lr at the smallest batch last
    args.batch_sizes, args.optimizers = [64, 256, 512, 1024], ["lamb", "adamw"]
    specs = grid.plan(args)
    order = [s.name for s in sorted(specs, key=lambda s: grid.run_priority(s, specs, args.optimizers))]
    assert order.index("adamw_b512_lrx1") < order.index("lamb_b512_lrx0.5")
    assert order[-10:] == [f"{o}_b{b}_lrx{m}" for b, m in ((512, "0.5"), (512, "2"), (256, "0.5"), (256, "2"), (64, "0.5"))
                           for o in ("lamb", "adamw")]


def test_repeats_take_the_best_lr_at_the_ends(tmp_path):
    args = make_args(tmp_path)
    args.batch_sizes, args.search_all, args.repeat_best = [64, 1024], ["lamb"], 2
    results = [dict(fake_result("lamb", 64, 1e-3, [(1000, 4.0)]), lr_multiplier=1.0, steps=10, micro_batch=64),
               dict(fake_result("lamb", 64, 2e-3, [(1000, 4.4)]), lr_multiplier=2.0, steps=10, micro_batch=64),
               dict(fake_result("lamb", 1024, 4e-3, [(4096, 6.0)]), lr_multiplier=1.0, steps=4, micro_batch=64)]
    args.np, args.micro_batch, args.samples = 1, 64, 8192
    reps = grid.repeat_specs(args, results)
    assert [(r.batch, r.lr_multiplier, r.seed_offset) for r in reps] == [(64, 1.0, 1), (1024, 1.0, 1)]
    assert reps[0].name == "lamb_b64_lrx1_s1"
    # repeats are reported beside the best run, never chosen as the best themselves
    results.append(dict(fake_result("lamb", 64, 1e-3, [(900, 4.0)]), lr_multiplier=1.0, seed_offset=1))
    row = grid.scaling_summary(results)["lamb"][0]
    assert row["samples_to_target"] == pytest.approx(1000) and row["steps_to_target_other_seeds"] == [pytest.approx(900 / 64)]


def test_unigram_entropy_of_the_held_out_tokens(tmp_path):
    import numpy as np

    from data_prep import shardio

    d = tmp_path / "seq8"
    d.mkdir()
    train = np.array([5, 5, 5, 6, 0, 1], np.uint16)  # 0, 1 special: ignored
    held = np.array([5, 6, 6, 7], np.uint16)
    for k, toks in enumerate((train, held)):
        shardio.write_arrays(d / f"shard_{k}.bin", {"tokens": toks})
    (d / "manifest.json").write_text(json.dumps({
        "num_shards": 2, "shards": [{"path": "shard_0.bin"}, {"path": "shard_1.bin"}], "split": {"heldout_shards": [1]},
        "vocab": {"size": 8, "special_ids": {"[PAD]": 0, "[CLS]": 1}}}))
    p = {5: (3 + 1) / (4 + 8), 6: (1 + 1) / (4 + 8), 7: 1 / (4 + 8)}  # add-one over the 8-token vocab
    want = -(np.log(p[5]) + 2 * np.log(p[6]) + np.log(p[7])) / 4
    assert grid.unigram_entropy(d) == pytest.approx(want)


def test_a_finished_run_keeps_only_small_files(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / "step0000010").mkdir(parents=True)
    (run / "checkpoints" / "step0000010" / "big.pt").write_bytes(b"x" * 1000)
    (run / "log.txt").write_text("\n".join(f"line {i}" for i in range(500)))
    (run / "metrics.jsonl").write_text("{}\n")
    grid.compact(run)
    assert not (run / "checkpoints").exists() and (run / "metrics.jsonl").is_file()
    lines = (run / "log.txt").read_text().splitlines()
    assert len(lines) == 201 and lines[-1] == "line 499"


def test_an_lr_search_whose_best_is_at_an_edge_goes_one_step_further(tmp_path):
    args = make_args(tmp_path)
    args.extend_edges, args.np, args.micro_batch, args.samples = True, 1, 64, 8192
    args.lr_multipliers = [1 / 3, 1.0, 3.0]
    results = [dict(fake_result("lamb", 64, m, [(1000, loss)]), lr_multiplier=m)
               for m, loss in ((1 / 3, 4.0), (1.0, 4.2), (3.0, 4.4))]  # the lowest lr is the best
    results += [dict(fake_result("lamb", 256, m, [(4000, loss)]), lr_multiplier=m)
                for m, loss in ((1 / 3, 4.6), (1.0, 4.0), (3.0, 4.7))]  # a best inside: nothing to add
    extra = grid.edge_specs(args, results)
    assert [(x.batch, x.lr_multiplier) for x in extra] == [(64, pytest.approx(1 / 9))]


def test_edge_extensions_run_the_fully_searched_optimizers_and_larger_batches_first(tmp_path):
    args = make_args(tmp_path)
    args.extend_edges, args.np, args.micro_batch, args.samples = True, 1, 64, 8192
    args.lr_multipliers, args.search_all = [1 / 3, 1.0, 3.0], ["lamb", "adamw"]
    args.lr["lars"] = 1.0
    results = []
    for opt, batch in (("lars", 1024), ("lamb", 32), ("adamw", 512), ("lars", 32), ("lamb", 128), ("adamw", 256)):
        results += [dict(fake_result(opt, batch, m, [(1000, loss)]), lr_multiplier=m)
                    for m, loss in ((1 / 3, 4.8), (1.0, 4.6), (3.0, 4.0))]  # each best at the top edge
    extra = grid.edge_specs(args, results)
    assert [(x.optimizer, x.batch) for x in extra] == [("adamw", 512), ("adamw", 256), ("lamb", 128), ("lamb", 32),
                                                       ("lars", 1024), ("lars", 32)]
    assert all(x.lr_multiplier == pytest.approx(9.0) for x in extra)


def test_every_step_has_two_micro_batches_to_measure_the_noise_scale(tmp_path):
    args = make_args(tmp_path)
    args.np, args.micro_batch, args.samples = 1, 64, 8192
    assert grid.make_spec(args, "lamb", 32, 1.0).micro_batch == 16
    assert grid.make_spec(args, "lamb", 1024, 1.0).micro_batch == 64
    args.np = 2  # two ranks are two micro-batches already
    assert grid.make_spec(args, "lamb", 32, 1.0).micro_batch == 16


def test_the_plot_overlays_the_prediction_of_the_best_tuned_small_batch_run(tmp_path):
    # A prediction scales its run's own step count: of two at the smallest batch, the run that
    # reached the target first (its lr the better tuned) is the one overlaid.
    results = [fake_result("lamb", 32, 1e-3, [(1000, 5.0), (2000, 4.0)]),   # 4.5 at 1500 samples
               fake_result("lamb", 32, 3e-3, [(1000, 4.6), (2000, 4.2)]),   # 4.5 at 1250: faster
               fake_result("lamb", 64, 3e-3, [(2000, 4.0)])]
    for r, name in zip(results, ("lamb_b32_lrx1", "lamb_b32_lrx3", "lamb_b64_lrx1")):
        r["name"] = name
        (tmp_path / name).mkdir()
        (tmp_path / name / "prediction.json").write_text(json.dumps({"target_loss": 4.5, "run": name}))
    (tmp_path / "lamb_b32_lrx3" / "prediction.json").write_text(json.dumps({"target_loss": 5.0, "run": "other"}))
    assert grid.overlay_prediction(results, tmp_path, 4.5)["run"] == "lamb_b32_lrx1"  # x3's is for 5.0
    (tmp_path / "lamb_b32_lrx3" / "prediction.json").write_text(json.dumps({"target_loss": 4.5, "run": "x3"}))
    assert grid.overlay_prediction(results, tmp_path, 4.5)["run"] == "x3"


GRID = ["grid", "--config", "c.json", "--data", "d", "--batch-sizes", "128,2048", "--optimizers", "lamb",
        "--samples", "8192", "--base-batch", "128", "--lr", "lamb=4e-3", "--np", "1"]


def test_the_command_line_lists_its_commands_and_refuses_bad_flags_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and all(f"    {c} " in out for c in ("grid", "confirm", "predict"))
    with pytest.raises(SystemExit) as exc:
        main(["confirm", "--help"])
    assert exc.value.code == 0 and "--grid GRID_DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # flags that do not fit together: argparse's usage error
        main([a if a != "1" else "3" for a in GRID] + ["--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.splitlines()[-1] == \
        "python -m scaling grid: error: batch 128 is not divisible by --np 3"
    # fewer samples than one step: one line, nothing written
    assert main([a if a != "8192" else "1000" for a in GRID] + ["--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "scaling grid: --samples 1000 is less than one step at batch 2048\n"
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_the_grid_writes_everything_but_the_plots(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` finds when not installed
    monkeypatch.delitem(sys.modules, "scaling.plots", raising=False)
    r = fake_result("lamb", 128, 4e-3, [(4096, 5.0), (8192, 4.0)])
    r.update(name="lamb_b128_lrx1", lr_multiplier=1.0, steps=64, exit_code=0, wall_s=1.0)
    grid.write_outputs([r], tmp_path, 4.5)
    assert capsys.readouterr().err == "scaling: matplotlib is not installed; no plots\n"
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][0]["steps_to_target"] == pytest.approx(48)
    assert "| 128 | ×1 of 1: 4.000, 48 steps |" in (tmp_path / "comparison.md").read_text()
    assert not list(tmp_path.glob("*.png"))
