"""BERT for pretraining with an MLM head that only computes logits at masked positions.

The modules are ``transformers.BertForPreTraining``'s own, so parameter names (and the tied
decoder/word-embedding weight) are identical and a checkpoint exports with ``save_pretrained``
and no key surgery. Only ``forward`` differs: the hidden states of the (at most
``max_predictions``) masked positions are gathered *before* the transform and the vocab
projection, which at seq 128 with 20 predictions skips ~84% of the largest matmul.
Attention is PyTorch's scaled_dot_product_attention (``attn_implementation="sdpa"``). Packed
batches (``pretrain.packing``) run the same modules with a block-diagonal mask and per-sample
position ids, and pool each sample's [CLS] wherever it sits in its row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining

# name -> (layers, hidden, heads); intermediate = 4 x hidden. Sizes of Turc et al. 2019
# ("Well-Read Students Learn Better", the google-research/bert miniatures) and the BERT paper.
PRESETS: dict[str, tuple[int, int, int]] = {
    "bert-tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def bert_config(model: str, vocab_size: int, max_position_embeddings: int = 512) -> BertConfig:
    """A ``BertConfig`` from a preset name or a ``config.json`` path, with the data's vocab size.

    512 position embeddings exist from phase 1 on, so phase 2 (seq 512) loads phase 1 as is.
    """
    if model in PRESETS:
        layers, hidden, heads = PRESETS[model]
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=4 * hidden,
                         max_position_embeddings=max_position_embeddings)
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
        try:
            cfg = BertConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a BERT config.json ({exc})") from None
        if cfg.vocab_size != vocab_size:
            raise ValueError(f"{path}: vocab_size {cfg.vocab_size} but the data's vocab has {vocab_size} tokens")
    cfg._attn_implementation = "sdpa"
    return cfg


@dataclass
class PretrainingOutput:
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    nsp_loss: torch.Tensor
    mlm_correct: torch.Tensor  # counts, so accuracies can be summed over ranks and steps
    mlm_count: torch.Tensor
    nsp_correct: torch.Tensor
    nsp_count: torch.Tensor


class BertPretrainingModel(BertForPreTraining):
    """``BertForPreTraining`` whose forward takes the data_prep batch layout, padded or packed.

    Padded: ``masked_lm_positions`` (B, P) index the masked tokens of each row,
    ``masked_lm_labels`` (B, P) hold their original ids with -1 for padding slots. Packed
    (``pretrain/packing.py``: ``sample_ids`` given): R rows of several samples each, with
    ``position_ids`` restarting per sample, ``masked_lm_positions`` (M, P) and ``cls_positions``
    (M,) flat indices into the R x pack_len positions; labels stay (M, P) and (M,). Loss = mean
    MLM cross-entropy over real slots + mean NSP/SOP cross-entropy, as in the BERT recipe: the
    same numbers either way.
    """

    def forward(self, input_ids, token_type_ids, attention_mask=None, masked_lm_positions=None,
                masked_lm_labels=None, next_sentence_label=None, full_vocab_projection: bool = False, *,
                position_ids=None, sample_ids=None, cls_positions=None, **_) -> PretrainingOutput:
        logits, nsp_logits = self.logits(input_ids, token_type_ids, attention_mask, masked_lm_positions,
                                         full_vocab_projection, position_ids=position_ids, sample_ids=sample_ids,
                                         cls_positions=cls_positions)
        labels = masked_lm_labels.masked_fill(masked_lm_labels < 0, -100)
        mlm_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
        nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.reshape(-1))
        with torch.no_grad():
            real = labels != -100
            mlm_correct = ((logits.argmax(-1) == labels) & real).sum()
            nsp_correct = (nsp_logits.argmax(-1) == next_sentence_label.reshape(-1)).sum()
        # nsp_count: a fill kernel; torch.tensor(n, device=...) would be a blocking host-to-device copy
        return PretrainingOutput(loss=mlm_loss + nsp_loss, mlm_loss=mlm_loss.detach(), nsp_loss=nsp_loss.detach(),
                                 mlm_correct=mlm_correct, mlm_count=real.sum(), nsp_correct=nsp_correct,
                                 nsp_count=torch.full((), nsp_logits.size(0), device=nsp_logits.device))

    def logits(self, input_ids, token_type_ids, attention_mask=None, masked_lm_positions=None,
               full_vocab_projection: bool = False, *, position_ids=None, sample_ids=None, cls_positions=None,
               **_) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLM logits at the masked positions (samples, P, vocab), NSP/SOP logits (samples, 2))."""
        if sample_ids is not None:
            return self._packed_logits(input_ids, token_type_ids, position_ids, sample_ids, masked_lm_positions,
                                       cls_positions, full_vocab_projection)
        # The padding mask goes in as SDPA's boolean (B, 1, 1, L) mask: given the 2-D mask,
        # transformers first asks whether it has any padding at all (``mask.all()``, a host sync
        # per forward) to drop it when it has none; a 4-D mask is used as it is.
        seq, pooled = self.bert(input_ids=input_ids, token_type_ids=token_type_ids,
                                attention_mask=attention_mask[:, None, None, :].bool(), return_dict=False)[:2]
        if full_vocab_projection:  # the naive head, kept for the benchmark's comparison
            logits = self.cls.predictions(seq)
            logits = torch.gather(logits, 1, masked_lm_positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
        else:
            hidden = torch.gather(seq, 1, masked_lm_positions.unsqueeze(-1).expand(-1, -1, seq.size(-1)))
            logits = self.cls.predictions(hidden)
        return logits, self.cls.seq_relationship(pooled)

    def _packed_logits(self, input_ids, token_type_ids, position_ids, sample_ids, masked_lm_positions,
                       cls_positions, full_vocab_projection: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Block-diagonal attention, SDPA's boolean (R, 1, L, L) mask (True: attend): a position
        # sees the positions of its own sample only. Padding (-1) sees the row's padding, so no
        # query has every key masked (a softmax over nothing is NaN); nothing reads its output.
        mask = (sample_ids[:, :, None] == sample_ids[:, None, :]).unsqueeze(1)
        seq = self.bert(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                        attention_mask=mask, return_dict=False)[0]
        flat = seq.reshape(-1, seq.size(-1))                      # (R * L, hidden)
        # BERT's pooler reads position 0 of each row: here each sample's [CLS], wherever it sits
        pooled = self.bert.pooler(flat[cls_positions].unsqueeze(1))
        if full_vocab_projection:
            logits = self.cls.predictions(flat)[masked_lm_positions]
        else:
            logits = self.cls.predictions(flat[masked_lm_positions])
        return logits, self.cls.seq_relationship(pooled)


def build_model(model: str, vocab_size: int, seed: int) -> BertPretrainingModel:
    torch.manual_seed(seed)
    return BertPretrainingModel(bert_config(model, vocab_size))


def load_weights(model: BertPretrainingModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a full state dict; the tied decoder weight may be absent (it is the embedding)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# pretrain.compile: what torch.compile compiles (or a backend name: the whole model with that backend)
COMPILE_MODES = {
    "off": "eager",
    "auto": '"layers" on an accelerator, "off" on the CPU',
    "layers": "each encoder layer in place, one compiled graph shared by all (regional compilation)",
    "model": "the whole module (DeepSpeed's engine.compile)",
    "default": '"model" (the name earlier configs use)',
}


def check_compile(setting: str) -> None:
    """``pretrain.compile``: one of ``COMPILE_MODES`` or a backend ``torch.compile`` knows (checked
    before any process group exists; an unknown name would otherwise fail at the first step)."""
    if setting in COMPILE_MODES:
        return
    import torch._dynamo

    known = [b for b in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in b and "minifier" not in b]
    if setting not in known:
        raise ValueError(f"pretrain.compile {setting!r} is not a torch.compile backend (modes "
                         f"{', '.join(map(repr, COMPILE_MODES))}, or one of {sorted(known)})")


def resolve_compile(setting: str, device_kind: str | None = None) -> str:
    """What a run compiles: "auto" is "layers" on an accelerator and "off" on the CPU (there
    inductor's C++ compilation takes longer than a short run's whole training), "default" is
    "model"; other settings stay. ``device_kind`` defaults to DeepSpeed's accelerator ("cuda", ...)."""
    if setting == "auto":
        if device_kind is None:
            from deepspeed.accelerator import get_accelerator

            device_kind = get_accelerator().device_name()
        return "off" if device_kind == "cpu" else "layers"
    return "model" if setting == "default" else setting


def _batch_dim_dynamic(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the eager module around the compiled ones (the encoder, or the engine):
    dimension 0 of the tensors it passes on is dynamic from the first compilation on, so one graph
    serves every packed row count, instead of a static graph for the first count and a recompiled
    dynamic one at the first other count. ``maybe_``: a dimension the graph needs fixed (the
    samples' count) or a count of 1 specialises rather than fails."""
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def compile_layers(model: BertPretrainingModel, backend: str = "inductor", dynamic_rows: bool = False) -> int:
    """Regional compilation: ``torch.compile`` each encoder layer in place (``Module.compile``).

    The layers run the same code on same-shaped inputs, so Dynamo compiles the first and the
    others reuse its graph (their parameters are graph inputs, not constants): the first step
    costs one layer's compilation whatever the depth. In place, so the module tree and the
    parameter names, hence state_dict, checkpoints and the export, are the eager model's. With
    ``dynamic_rows`` the batch dimension is dynamic from the start (packed rows). Returns the
    number of layers compiled."""
    import torch._dynamo  # the pre-hook's maybe_mark_dynamic

    layers = model.bert.encoder.layer
    for layer in layers:
        layer.compile(backend=backend)
    if dynamic_rows:
        model.bert.encoder.register_forward_pre_hook(_batch_dim_dynamic, with_kwargs=True)
    return len(layers)


def compile_engine(engine, setting: str, dynamic_rows: bool = False, auto: bool = False) -> str:
    """Compile the engine's module as ``setting`` (resolved: not "auto") says; parameter names,
    hence checkpoints, are unchanged either way. ``dynamic_rows``: the batch dimension varies
    (packed micro-batches). Returns the start line's note; ``auto``: the setting came from "auto"."""
    how = f"auto on {engine.device.type}" if auto else ""
    if setting == "off":
        return ", compile off" + (f" ({how})" if how else "")
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().get_compile_backend()
    if setting == "layers":
        n = compile_layers(engine.module, backend, dynamic_rows)
        what = f"layers: {n} encoder layers, {backend}"
    else:  # the whole module, with the accelerator's backend or the one named
        whole = setting in ("model", "default")
        engine.compile(backend=backend if whole else setting)
        what = f"model, {backend}" if whole else setting
        if dynamic_rows:  # the engine's forward stays eager: its pre-hook runs before the compiled module
            import torch._dynamo

            engine.register_forward_pre_hook(_batch_dim_dynamic, with_kwargs=True)
    return f", model compiled ({what}{'; ' + how if how else ''})"


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (Dynamo's counter: a Python int, no
    device sync). It stops growing once every shape the run feeds has been compiled."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


__all__ = ["PRESETS", "COMPILE_MODES", "BertPretrainingModel", "PretrainingOutput", "bert_config", "build_model",
           "load_weights", "count_parameters", "check_compile", "resolve_compile", "compile_layers",
           "compile_engine", "compiled_graphs"]
