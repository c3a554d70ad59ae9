"""Checkpoints: DeepSpeed's engine state plus ours, complete or absent, last K kept.

Layout of ``OUTPUT/checkpoints``::

    step0000200/            DeepSpeed files (model, ZeRO optimizer partitions, scheduler)
        client_state in DeepSpeed's model file: step, samples, sampler position, config hash
        rng_rank{r}.pt      each rank's RNG states (dropout), for a bitwise resume
        model_config.json   the BertConfig, so the checkpoint exports on its own
    latest                  name of the newest complete checkpoint

DeepSpeed is told not to write ``latest``; after every rank has finished its files, rank 0
replaces ``latest`` atomically (temp file + rename). A crash while saving therefore leaves the
previous ``latest`` in force, and the unfinished directory is removed by the next save.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run output dir, a checkpoints dir or one checkpoint dir."""
    path = Path(path)
    for ckpt_dir in (path / "checkpoints", path):
        tag = latest_tag(ckpt_dir)
        if tag:
            return ckpt_dir, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (expected OUTPUT/checkpoints/latest, "
                            "a checkpoints dir with 'latest', or a checkpoint directory)")


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save(engine, output: Path, step: int, client_state: dict, model_config_json: str, keep: int) -> Path:
    """Write checkpoint ``step`` on every rank; rank 0 then publishes it and prunes old ones."""
    import deepspeed.comm as dist

    ckpt_dir = output / "checkpoints"
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    tag_dir = ckpt_dir / tag
    tmp = tag_dir / f".rng_rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, tag_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        atomic_write_text(tag_dir / "model_config.json", model_config_json)
    dist.barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and unfinished leftovers."""
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    if current is None:
        return
    complete = [t for t in tags if t <= current]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [t for t in tags if t > current]  # written after `latest`: an interrupted save
    for t in doomed:
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def load_resume(engine, output: Path) -> Optional[dict]:
    """Restore the newest checkpoint of this run (engine, RNG); returns its client state."""
    import deepspeed.comm as dist

    ckpt_dir = output / "checkpoints"
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    rng = ckpt_dir / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    client["_tag"] = tag
    return client


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full-precision model weights of a DeepSpeed checkpoint (any ZeRO stage, any world size).

    ZeRO checkpoints hold the fp32 master weights in the optimizer partitions; they are merged.
    Without ZeRO the model file holds the weights (in the precision the model trained in).
    """
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (ValueError, KeyError):
            pass  # not a ZeRO layout (e.g. the bf16 optimizer of stage 0): use the model file
    model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{tag_dir}: no mp_rank_*_model_states.pt; not a DeepSpeed checkpoint")
    module = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}
