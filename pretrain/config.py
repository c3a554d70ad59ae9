"""The run's configuration: one DeepSpeed JSON holding DeepSpeed's keys plus a ``"pretrain"`` block.

``load(path, overrides)`` returns the DeepSpeed part (what ``deepspeed.initialize`` sees) and a
typed :class:`PretrainConfig`. CLI flags override the documented keys; the merged result is
written to ``OUTPUT/config.effective.json`` so every run records exactly what it ran with.

The LR schedule lives in the DeepSpeed ``scheduler`` block; its ``total_num_steps`` is filled
from ``pretrain.max_steps`` (one number, one place). Batch arithmetic (micro batch ×
accumulation × world size = global batch) is checked here once the world size is known, before
the model is built.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

# Phase 2's LAMB state from phase 1: "keep" the moments and restart the step count (bias
# correction from t = 1, as NVIDIA's phase 2), "keep_step" the moments and the step count, or
# "reset" both (a fresh optimizer; any world size).
KNOWN_PHASE_STATE = ("keep", "keep_step", "reset")
PACKING_MODES = ("off", "ffd")  # pretrain.packing: padded rows, or first-fit-decreasing packed rows


class ConfigError(ValueError):
    """A bad configuration; the message names the file and the key."""


@dataclass
class PretrainConfig:
    """The ``"pretrain"`` block. Paths are relative to the working directory."""

    data: Optional[str] = None            # a data_prep output for this seq len, e.g. data/seq128
    output: str = "runs/pretrain"         # checkpoints, metrics.jsonl, TensorBoard, effective config
    model: str = "bert-tiny"              # preset (bert-tiny, mini, small, medium, base, large) or config.json
    phase: int = 1                        # 1: seq 128, 2: seq 512 (informational; seq_len decides)
    seq_len: int = 128                    # must equal the data's seq_len
    max_predictions: int = 20             # must equal the data's max_predictions_per_seq
    max_steps: int = 1000                 # optimizer steps of this phase
    seed: int = 42
    init_checkpoint: Optional[str] = None  # phase 2: phase 1's output dir or a checkpoint/export dir
    init_optimizer_state: str = "keep"     # phase 2: "keep" (NVIDIA's), "keep_step" or "reset"; see above
    log_every: int = 10                   # steps between progress lines / metrics.jsonl records
    eval_every: int = 0                   # steps between held-out MLM evaluations (0: only at the end)
    eval_samples: int = 512               # held-out samples per evaluation
    validation_shards: int = 1            # 0: no held-out evaluation; data built before the document
                                          # split: its last N shards are held out
    checkpoint_every: int = 0             # steps between checkpoints (0: only at the end / on signal)
    keep_checkpoints: int = 3             # most recent checkpoints kept
    export_on_save: bool = False          # also write a Hugging Face export next to each checkpoint
    num_workers: int = 1                  # DataLoader workers per rank
    trust_ratio_histogram_every: int = 100  # steps between TensorBoard trust-ratio histograms (0: off)
    tensorboard: bool = True
    gns_every: int = 10                   # steps between gradient-noise-scale measurements (0: off); pretrain/gns.py
    gns_ema: float = 0.95                 # decay of the noise scale's moving averages, per measurement
    max_consecutive_skips: int = 50       # fp16: steps in a row the loss scaler may skip before the run stops
    peak_tflops: Optional[float] = None   # accelerator peak for MFU (default: pretrain.metrics.PEAK_TFLOPS)
    compile: str = "auto"                 # torch.compile (the accelerator's backend, inductor on GPUs):
                                          # "layers" each encoder layer in place (one graph for all of them,
                                          # a short first step), "model" the whole module ("default": the
                                          # same), "off" eager, "auto" = "layers" on an accelerator and "off"
                                          # on the CPU; or a backend name ("aot_eager", ...): the whole module
                                          # with that backend. config.effective.json records the resolved mode
    packing: str = "off"                  # "ffd": several samples per row of pack_len positions, attention
                                          # confined to each sample (pretrain/packing.py); the same math,
                                          # fewer padding positions. Micro/global batches stay in samples
    pack_len: Optional[int] = None        # positions per packed row (default seq_len); e.g. 2 x seq_len
                                          # fits more short samples together, at more attention per row
    pack_buckets: int = 32                # packed row counts per micro-batch are rounded up to at most
                                          # this many sizes (shapes a compiled model sees)
    extra: dict = field(default_factory=dict, repr=False)

    def validate(self, source: str) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: pretrain.{key} {why}")

        def integer(v) -> bool:  # JSON's 5, not "5", 5.0 or true: a string would fail mid-training
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)

        for key in ("seq_len", "max_predictions", "max_steps", "log_every", "keep_checkpoints", "max_consecutive_skips"):
            if not integer(getattr(self, key)) or getattr(self, key) <= 0:
                raise bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        for key in ("eval_every", "checkpoint_every", "validation_shards", "num_workers", "eval_samples",
                    "trust_ratio_histogram_every", "gns_every"):
            if not integer(getattr(self, key)) or getattr(self, key) < 0:
                raise bad(key, f"must be an integer >= 0, got {getattr(self, key)!r}")
        if not number(self.gns_ema) or not 0.0 <= self.gns_ema < 1.0:
            raise bad("gns_ema", f"must be in [0, 1), got {self.gns_ema!r}")
        if self.peak_tflops is not None and (not number(self.peak_tflops) or not self.peak_tflops > 0):
            raise bad("peak_tflops", f"must be a positive number, got {self.peak_tflops!r}")
        if not isinstance(self.compile, str) or not self.compile:
            raise bad("compile", "must be \"auto\", \"layers\", \"model\", \"off\" or a torch.compile backend name, "
                      f"got {self.compile!r}")
        if self.packing not in PACKING_MODES:
            raise bad("packing", f"must be one of {PACKING_MODES}, got {self.packing!r}")
        if self.pack_len is not None and (not isinstance(self.pack_len, int) or self.pack_len < self.seq_len):
            raise bad("pack_len", f"must be an integer >= seq_len ({self.seq_len}), got {self.pack_len!r}")
        if not isinstance(self.pack_buckets, int) or self.pack_buckets <= 0:
            raise bad("pack_buckets", f"must be a positive integer, got {self.pack_buckets!r}")
        if self.init_optimizer_state not in KNOWN_PHASE_STATE:
            raise bad("init_optimizer_state", f"must be one of {KNOWN_PHASE_STATE}, got {self.init_optimizer_state!r}")
        if self.max_predictions > self.seq_len:
            raise bad("max_predictions", f"({self.max_predictions}) exceeds seq_len ({self.seq_len})")
        if not self.data:
            raise bad("data", "is not set (give --data DIR, a data_prep output such as OUT/seq128)")


# CLI flag -> (where it goes). "pretrain.x" is our block, anything else a top-level DeepSpeed key.
OVERRIDES = {
    "data": "pretrain.data", "output": "pretrain.output", "model": "pretrain.model",
    "max_steps": "pretrain.max_steps", "seed": "pretrain.seed", "init_checkpoint": "pretrain.init_checkpoint",
    "train_batch_size": "train_batch_size", "micro_batch_size": "train_micro_batch_size_per_gpu",
}


def read_json(path: str | Path) -> dict:
    from optim.initialize import load_config

    try:
        cfg = load_config(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"config {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path}: the top level must be an object")
    return cfg


def apply_set(raw: dict, assignments: list[str], source: str) -> None:
    """``--set a.b.c=VALUE`` (VALUE parsed as JSON, else taken as a string) into the config dict."""
    for item in assignments or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. pretrain.log_every=1")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} in {source} is not an object")
        node[parts[-1]] = value


def load(path: str | Path, overrides: Optional[dict[str, Any]] = None,
         assignments: Optional[list[str]] = None) -> tuple[dict, PretrainConfig]:
    """(DeepSpeed config without our block, typed pretrain config), CLI overrides applied:
    first ``--set KEY=VALUE`` assignments, then the named flags."""
    raw = read_json(path)
    apply_set(raw, assignments or [], str(path))
    ds = copy.deepcopy(raw)
    block = ds.pop("pretrain", {})
    ds = {k: v for k, v in ds.items() if not k.startswith("_comment")}
    if not isinstance(block, dict):
        raise ConfigError(f"config {path}: 'pretrain' must be an object")
    known = {f.name for f in fields(PretrainConfig)} - {"extra"}
    unknown = sorted(set(block) - known - {"_comment"})
    if unknown:
        raise ConfigError(f"config {path}: unknown pretrain key(s) {unknown}; known: {sorted(known)}")
    block = {k: v for k, v in block.items() if k in known}
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        target = OVERRIDES[flag]
        if target.startswith("pretrain."):
            block[target.split(".", 1)[1]] = value
        else:
            ds[target] = value
            if flag in ("train_batch_size", "micro_batch_size"):
                ds.pop("gradient_accumulation_steps", None)  # re-derived from the other two
    cfg = PretrainConfig(**block)
    cfg.validate(str(path))
    check_optimizer_values(ds, str(path))
    check_nonfinite_guard(ds, str(path))
    sched = ds.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        if "total_num_steps" in params and int(params["total_num_steps"]) != cfg.max_steps:
            raise ConfigError(f"config {path}: scheduler.params.total_num_steps ({params['total_num_steps']}) "
                              f"differs from pretrain.max_steps ({cfg.max_steps}); remove it, it is filled in")
        params["total_num_steps"] = cfg.max_steps
    return ds, cfg


# Optimizer and scheduler numbers that cannot describe training, refused by check_optimizer_values:
# (block, key) -> (what a value must satisfy besides being a finite number, how to say it). The
# optimizer classes accept some of them: lr 0 trains nothing yet writes checkpoints, and NaN passes
# every "< 0" test.
_POSITIVE = (lambda v: v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a finite number >= 0")
_LIMITS = {
    ("optimizer", "lr"): _POSITIVE,
    ("optimizer", "weight_decay"): _NON_NEGATIVE,
    ("optimizer", "eps"): _NON_NEGATIVE,
    ("scheduler", "warmup_max_lr"): _POSITIVE,  # the peak lr of DeepSpeed's own WarmupLR/WarmupDecayLR
    ("scheduler", "warmup_min_lr"): _NON_NEGATIVE,
    ("scheduler", "warmup_proportion"): (lambda v: 0 <= v <= 1, "a finite number in [0, 1]"),
    ("scheduler", "warmup_num_steps"): _NON_NEGATIVE,
    ("scheduler", "power"): _NON_NEGATIVE,      # below 0 the decay ends in an infinite lr
    ("scheduler", "decay_rate"): _POSITIVE,
    ("scheduler", "decay_steps"): _POSITIVE,
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_optimizer_values(ds: dict, source: str) -> None:
    """Refuse a learning rate that is not a finite number > 0, and the other clearly meaningless
    values in ``_LIMITS`` and betas outside [0, 1): one line naming the key and the value."""
    def params(block: str) -> dict:
        p = ds.get(block).get("params") if isinstance(ds.get(block), dict) else None
        return p if isinstance(p, dict) else {}

    if not isinstance(ds.get("optimizer"), dict) or not isinstance(ds["optimizer"].get("type"), str):
        raise ConfigError(f"{source}: no optimizer block with a \"type\" (e.g. \"optimizer\": {{\"type\": \"Lamb\", "
                          "\"params\": {\"lr\": 6e-3}})")

    for (block, key), (ok, must) in _LIMITS.items():
        if key in params(block) and not (_finite(v := params(block)[key]) and ok(v)):
            raise ConfigError(f"{source}: {block}.params.{key} must be {must}, got {v!r}")
    betas = params("optimizer").get("betas", (0.9, 0.999))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{source}: optimizer.params.betas must be two numbers in [0, 1), got {betas!r}")


def check_nonfinite_guard(ds: dict, source: str) -> None:
    """Something must notice inf/NaN gradients in bf16: DeepSpeed's per-tensor scan
    (``bf16.check_grad_overflow``) or run.py's check of the global gradient norm, which ZeRO
    computes unless ``zero_optimization.compute_grad_norm`` is false."""
    bf16, zero = ds.get("bf16"), ds.get("zero_optimization")
    if not isinstance(bf16, dict) or bf16.get("enabled", False) is False or not isinstance(zero, dict):
        return
    if bf16.get("check_grad_overflow", True) is False and zero.get("compute_grad_norm", True) is False:
        raise ConfigError(f"{source}: bf16.check_grad_overflow and zero_optimization.compute_grad_norm are both "
                          "false: nothing would notice inf/NaN gradients; set one of them to true")


def resolve_batch(ds: dict, world_size: int, source: str) -> tuple[int, int, int]:
    """(global batch, micro batch, accumulation steps), checked: micro × accum × world = global.

    Any one of the three may be omitted and is derived; DeepSpeed receives all three.
    """
    glob = ds.get("train_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    if glob is None and (micro is None or accum is None):
        raise ConfigError(f"{source}: set train_batch_size, or both train_micro_batch_size_per_gpu and "
                          "gradient_accumulation_steps")
    if glob is not None and micro is None:
        accum = accum or 1
        if glob % (accum * world_size):
            raise ConfigError(f"{source}: train_batch_size {glob} is not divisible by gradient_accumulation_steps "
                              f"{accum} x world size {world_size}")
        micro = glob // (accum * world_size)
    elif glob is not None and accum is None:
        if glob % (micro * world_size):
            raise ConfigError(f"{source}: train_batch_size {glob} is not a multiple of train_micro_batch_size_per_gpu "
                              f"{micro} x world size {world_size} = {micro * world_size}")
        accum = glob // (micro * world_size)
    elif glob is None:
        glob = micro * accum * world_size
    if micro * accum * world_size != glob:
        raise ConfigError(f"{source}: train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {accum} "
                          f"x world size {world_size} = {micro * accum * world_size}, not train_batch_size {glob}")
    ds.update(train_batch_size=glob, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return glob, micro, accum


def effective(ds: dict, cfg: PretrainConfig) -> dict:
    out = copy.deepcopy(ds)
    out["pretrain"] = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    return out
