"""End to end on the CPU with 2 processes (gloo, ZeRO-2, bf16), with the shipped cpu configs:

data_prep on a small corpus -> phase 1 straight (launched with ``mpiexec -n 2``, ranks found by
mpi4py) and phase 1 stopped by a real Ctrl-C then resumed (``deepspeed --num_gpus 2``): the same
losses and bitwise the same weights -> phase 2 from phase 1 (one process: phase 1's ZeRO state of
2 ranks re-partitioned) -> export ->
``from_pretrained`` reproduces the MLM loss of the checkpoint. The data and phase 1 are session fixtures (conftest.py).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain_helpers import PHASE1, ROOT, RUN, STEPS, losses, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def optimizer_step(run_dir: Path, step: int) -> int:
    """LAMB's step count (what its bias correction uses) in rank 0's ZeRO partition of a checkpoint."""
    from pretrain.checkpoint import tag_for

    f = next((run_dir / "checkpoints" / tag_for(step)).glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
    steps = {int(s["step"]) for s in state["state"].values()}
    assert len(steps) == 1, steps
    return steps.pop()


def weights(run_dir: Path, step: int) -> dict:
    from pretrain.checkpoint import fp32_state_dict, tag_for

    return fp32_state_dict(run_dir / "checkpoints", tag_for(step))


def test_resume_repeats_the_uninterrupted_run_bitwise(phase1):
    a, b = losses(phase1 / "straight"), losses(phase1 / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a == b  # exact floats: same data order, masks, dropout and optimizer state
    wa, wb = weights(phase1 / "straight", 6), weights(phase1 / "resumed", 6)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_effective_config_and_metrics_are_written(phase1):
    eff = json.loads((phase1 / "straight" / "config.effective.json").read_text())
    assert eff["pretrain"]["max_steps"] == 6
    assert eff["train_batch_size"] == 16 and eff["gradient_accumulation_steps"] == 2
    assert eff["scheduler"]["params"]["total_num_steps"] == 6
    rec = [json.loads(x) for x in (phase1 / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "samples_per_s", "data_wait", "trust_min", "trust_median"} <= set(rec[0])
    assert all(0 <= r["data_wait"] < 1 for r in rec if "loss" in r)
    # the training loss split into its parts (MLM per masked token, NSP per sample): they add up to
    # the loss up to how unevenly the masked tokens fall over the micro-batches
    for r in (r for r in rec if "loss" in r):
        assert 0 < r["nsp_loss"] < 2 and r["mlm_loss"] > 1
        assert r["mlm_loss"] + r["nsp_loss"] == pytest.approx(r["loss"], rel=0.02)
    assert any("eval_mlm_loss" in r for r in rec)
    assert (phase1 / "straight" / "tensorboard").is_dir()


def test_phase2_then_export_reproduces_mlm_loss(phase1):
    from transformers import AutoModelForPreTraining, AutoModelForQuestionAnswering

    from data_prep import PretrainingDataset
    from pretrain.model import BertPretrainingModel, load_weights

    out = run([sys.executable, str(RUN), "--config", str(ROOT / "ds_configs/cpu_seq512.json"),
               "--data", "data/seq512", "--init-checkpoint", "straight", "--output", "phase2", "--max-steps", "2",
               "--train-batch-size", "8", "--micro-batch-size", "2", "--set", "bf16.enabled=true",
               "--set", "pretrain.eval_samples=16"], phase1)
    assert "initialised from straight (deepspeed)" in out
    # Phase 2 starts from phase 1's weights and moments, with its own learning rate and schedule:
    # phase 1 ended at lr 0, which the loaded optimizer state must not carry over. Over 2 steps
    # only the first has a non-zero lr (4e-3 x the schedule's multiplier at step 0), and a LAMB
    # step moves every adapted tensor by exactly lr * ||w|| (trust ratio ||w||/||u|| times u).
    p2_cfg = json.loads((ROOT / "ds_configs/cpu_seq512.json").read_text())
    from optim.schedules import multiplier_fn

    sched = multiplier_fn("WarmupPolyDecay", dict(p2_cfg["scheduler"]["params"], total_num_steps=2))
    expected = p2_cfg["optimizer"]["params"]["lr"] * sched(0)
    p1, p2 = weights(phase1 / "straight", 6), weights(phase1 / "phase2", 2)
    adapted = [k for k in p1 if ".encoder." in k and k.endswith(".weight") and p1[k].dim() == 2]
    assert len(adapted) >= 12
    for k in adapted:
        assert ((p2[k] - p1[k]).norm() / p1[k].norm()).item() == pytest.approx(expected, rel=1e-3), k
    # NVIDIA's phase 2 keeps the moments and restarts the step count (bias correction from t = 1);
    # "keep_step" (tests/test_pretrain_unit.py) carries phase 1's count on.
    assert optimizer_step(phase1 / "straight", 6) == 6
    assert optimizer_step(phase1 / "phase2", 2) == 2
    from pretrain.export import main as export_main

    assert export_main([str(phase1 / "phase2"), str(phase1 / "hf")]) == 0
    hf_dir = phase1 / "hf"
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "vocab.txt").is_file()

    ds = PretrainingDataset(phase1 / "data/seq512", max_predictions=80)
    items = [ds[i] for i in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    ours = BertPretrainingModel.from_pretrained(hf_dir).eval()  # same classes, same names
    reference = BertPretrainingModel(ours.config).eval()
    load_weights(reference, weights(phase1 / "phase2", 2), "phase2")
    with torch.no_grad():
        want = reference(**batch).mlm_loss
        got = ours(**batch).mlm_loss
        hf = AutoModelForPreTraining.from_pretrained(hf_dir).eval()
        labels = torch.full(batch["input_ids"].shape, -100)
        for b in range(4):
            for pos, lab in zip(batch["masked_lm_positions"][b], batch["masked_lm_labels"][b]):
                if lab >= 0:
                    labels[b, pos] = lab
        logits = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"]).prediction_logits
        hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_loss, want, rtol=1e-4, atol=1e-4)
    AutoModelForQuestionAnswering.from_pretrained(hf_dir)  # loads as an encoder for SQuAD


def test_finetune_loads_the_deepspeed_checkpoint_directly(phase1):
    """finetune.checkpoint.load_model(run dir) = the checkpoint's fp32 encoder + a fresh QA head."""
    from finetune.checkpoint import load_model

    model, tokenizer = load_model(phase1 / "straight")
    want = weights(phase1 / "straight", 6)
    got = model.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight"):
        assert torch.equal(got[name], want[name]), name
    assert tokenizer.is_fast and tokenizer.vocab_size == 2000


def in_process(cwd: Path, argv: list[str], capsys) -> str:
    """run.py's refusals come before any process group exists: run them here (exit 2, one line)."""
    import pretrain.run as run_mod

    argv = [str(cwd / a) if a.startswith(("data", "straight")) else a for a in argv]
    assert run_mod.cli(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_existing_run_is_not_overwritten_without_resume(phase1, capsys):
    before = (phase1 / "straight" / "config.effective.json").read_bytes()
    out = in_process(phase1, [*PHASE1, "--output", "straight"], capsys)
    assert "straight already holds checkpoints (latest step0000006" in out and "pass --resume" in out
    assert (phase1 / "straight" / "config.effective.json").read_bytes() == before


def test_bad_data_dir_fails_before_launching_ranks(pretrain_work, capsys):
    import pretrain.run as run_mod

    work = pretrain_work
    assert run_mod.cli([*PHASE1[:2], "--data", str(work / "data"), "--output", str(work / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a data_prep seq-len directory" in err and "seq128" in err
    assert run_mod.cli([*PHASE1[:2], "--data", str(work / "data/seq512"), "--output", str(work / "x")]) == 2
    assert f"pretrain.seq_len is 128 but {work / 'data/seq512'} holds seq_len 512" in capsys.readouterr().err
    assert not (work / "x").exists()


def test_phase2_refuses_a_checkpoint_of_another_vocabulary(phase1, capsys):
    """Same vocab size, other words: without the check phase 2 would train on garbled ids."""
    shutil.copytree(phase1 / "data", phase1 / "data_other_vocab", dirs_exist_ok=True)
    manifest = phase1 / "data_other_vocab" / "seq512" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["vocab"]["sha256"] = "0" * 64  # another vocabulary of the same size
    manifest.write_text(json.dumps(m))
    out = in_process(phase1, ["--config", str(ROOT / "ds_configs/cpu_seq512.json"), "--data", "data_other_vocab/seq512",
                              "--init-checkpoint", "straight", "--output", str(phase1 / "phase2_other_vocab")], capsys)
    assert "trained with another vocabulary (2000 tokens" in out and "data_prep build --vocab" in out
    assert not (phase1 / "phase2_other_vocab").exists()


def test_export_names_a_missing_or_truncated_zero_partition(phase1, capsys):
    from pretrain.export import main as export_main

    src = phase1 / "straight" / "checkpoints" / "step0000006"
    for case in ("missing", "truncated"):
        dst = phase1 / f"broken_{case}" / "step0000006"
        shutil.copytree(src, dst, dirs_exist_ok=True)
        part = next(dst.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        if case == "missing":
            part.unlink()
        else:
            (dst / "complete.json").unlink()  # as a checkpoint written before the marker existed
            with open(part, "r+b") as f:
                f.truncate(part.stat().st_size // 3)
        assert export_main([str(dst), str(phase1 / f"hf_{case}")]) == 2
        out = capsys.readouterr().err
        assert ("zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in out if case == "missing"
                else "cannot merge the ZeRO partitions" in out), out
        assert not (phase1 / f"hf_{case}" / "model.safetensors").exists()


@pytest.mark.parametrize("override,message", [
    (["--set", "optimizer.type=Lamd"], "optimizer.type 'Lamd' is unknown: registered here: "),
    (["--set", "optimizer.params.betaz=[0.9,0.99]"], "optimizer.params: optimizer Lamb: bad params"),
    (["--set", "optimizer.params.variant=nvdia"], "optimizer.params: unknown LAMB variant 'nvdia'"),
    (["--set", "scheduler.params.warmup_steps=5"], "scheduler.params: scheduler WarmupPolyDecay: unknown params ['warmup_steps']"),
    (["--model", "CONFIG"], "vocab_size 30522 but the data's vocab has 2000 tokens"),
    (["--set", "pretrain.compile=inductr"], "pretrain.compile 'inductr' is not a torch.compile backend"),
])
def test_bad_optimizer_or_model_settings_are_named_before_launching(pretrain_work, override, message, capsys):
    """In this process (the checks run before any process group exists): exit 2, one line."""
    import pretrain.run as run_mod

    work = pretrain_work
    if override[-1] == "CONFIG":
        from transformers import BertConfig

        (work / "model_30k").mkdir(exist_ok=True)
        (work / "model_30k" / "config.json").write_text(BertConfig(vocab_size=30522).to_json_string())
        override = ["--model", str(work / "model_30k" / "config.json")]
    args = [str(work / a) if a.startswith("data/") else a for a in PHASE1]
    assert run_mod.cli([*args, "--output", str(work / "bad_settings"), *override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (work / "bad_settings").exists()


def test_finetune_names_a_truncated_checkpoint(phase1, capsys):
    from finetune.squad import main as squad_main

    dst = phase1 / "broken_for_squad" / "checkpoints" / "step0000006"
    shutil.copytree(phase1 / "straight" / "checkpoints" / "step0000006", dst, dirs_exist_ok=True)
    part = next(dst.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    with open(part, "r+b") as f:
        f.truncate(part.stat().st_size // 2)
    squad = phase1 / "tiny_squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{
        "context": "Denver won.", "qas": [{"id": "a", "question": "Who won?",
                                           "answers": [{"text": "Denver", "answer_start": 0}]}]}]}]}))
    assert squad_main(["--checkpoint", str(phase1 / "broken_for_squad"), "--predict-file", str(squad),
                       "--output", str(phase1 / "squad_broken")]) == 2
    out = capsys.readouterr().err
    assert "truncated" in out and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in out, out[-2000:]
    assert not (phase1 / "squad_broken" / "predictions.json").exists()


def test_compiled_model_trains_as_the_eager_one_and_exports(pretrain_work):
    """``pretrain.compile`` (here the ``aot_eager`` backend, which compiles the graph but runs
    ATen's own kernels, so the CPU gives the eager numbers): DeepSpeed reports the module
    compiled; the same losses and noise scale (hooks attached at steps 2 and 4 and removed
    between: they must see the compiled backward's gradients); the checkpoint exports, so
    parameter names are unchanged."""
    common = ["--config", str(ROOT / "ds_configs/cpu_seq128.json"), "--data", "data/seq128", "--max-steps", "4",
              "--train-batch-size", "16", "--micro-batch-size", "8", "--set", "pretrain.log_every=1",
              "--set", "pretrain.eval_samples=32", "--set", "pretrain.gns_every=2", "--set", "bf16.enabled=false"]
    out, logs = {}, {}
    for name, setting in (("eager", "off"), ("compiled", "aot_eager")):
        shutil.rmtree(pretrain_work / f"compile_{name}", ignore_errors=True)
        logs[name] = run([sys.executable, str(RUN), *common, "--output", f"compile_{name}",
                          "--set", f"pretrain.compile={setting}"], pretrain_work)
        recs = [json.loads(x) for x in (pretrain_work / f"compile_{name}" / "metrics.jsonl").read_text().splitlines()]
        out[name] = [(r["step"], r["loss"], r.get("gns_g2")) for r in recs if "loss" in r]
    assert "model compiled (aot_eager)" in logs["compiled"] and "model compiled" not in logs["eager"]
    effective = json.loads((pretrain_work / "compile_compiled" / "config.effective.json").read_text())
    assert effective["pretrain"]["compile"] == "aot_eager"
    assert [s for s, _, _ in out["eager"]] == [s for s, _, _ in out["compiled"]] == [1, 2, 3, 4]
    assert [g is None for _, _, g in out["compiled"]] == [True, False, False, False]  # measured from step 2
    for (_, loss_e, g_e), (_, loss_c, g_c) in zip(out["eager"], out["compiled"]):
        assert loss_c == pytest.approx(loss_e, rel=1e-5)
        assert g_c == pytest.approx(g_e, rel=1e-3) if g_e is not None else g_c is None
    run([sys.executable, "-m", "pretrain.export", "compile_compiled", "compile_hf"], pretrain_work)
    assert (pretrain_work / "compile_hf" / "model.safetensors").is_file()
