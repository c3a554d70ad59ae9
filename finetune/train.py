"""The fine-tuning loop, with nothing lost on a stop: checkpoints every ``--checkpoint-every``
steps and at the step boundary after a stop request, and ``--resume`` to go on from the newest.

A stop request is what pretraining answers (:mod:`pretrain.stop`): SIGTERM, SIGINT (Ctrl-C),
SIGUSR1 (Slurm's warning), or the death of the launcher above the rank; all ranks agree on it
(one small all-reduce per step when there are several) and save the same step. The checkpoint
(:mod:`pretrain.checkpoint`'s layout: DeepSpeed's engine with AdamW and the schedule, each rank's
RNG, a completion marker) also holds the loop's position: step, epoch, micro-batches into the
epoch, windows seen, training seconds and the evaluations so far. A resumed run skips the
windows already trained on in that epoch's order and restores the RNG, so on a deterministic
device it repeats the uninterrupted run exactly. The settings that decide what is trained are
fingerprinted: ``--resume`` with other ones is refused, naming them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pretrain import checkpoint as ckpt

# Arguments whose change makes a resumed run another run.
RESUME_ARGS = ("checkpoint", "train_file", "max_train_examples", "version_2", "max_seq_length", "doc_stride",
               "max_query_length", "epochs", "max_steps", "lr", "batch_size", "grad_accum", "warmup",
               "weight_decay", "seed", "bf16", "config")


@dataclass
class Progress:
    step: int = 0             # optimizer steps done
    micro: int = 0            # micro-batches done (this rank): accumulation runs across epochs
    epoch: int = 0            # the epoch under way
    micro_in_epoch: int = 0   # micro-batches of that epoch done (this rank)
    seen: int = 0             # training windows seen, all ranks
    train_seconds: float = 0.0
    eval_log: list = field(default_factory=list)
    world: int = 1            # ranks: each trains its share of the windows, in an order per rank


def fingerprint(args) -> dict:
    picked = {k: getattr(args, k) for k in RESUME_ARGS}
    picked["hash"] = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return picked


def check_output(out_dir: Path, resume: bool, fp: dict) -> bool:
    """Whether this run resumes. Refused (ValueError, before anything is loaded): checkpoints
    present without ``--resume``, and ``--resume`` over a run with other settings."""
    ckpt_dir = out_dir / "checkpoints"
    present = ckpt.checkpoint_dirs(ckpt_dir)
    latest = ckpt.latest_tag(ckpt_dir)
    if present and not resume:
        raise ValueError(f"{out_dir} holds checkpoints of an unfinished fine-tuning run (latest "
                         f"{latest or 'none complete'}): pass --resume to continue it, or choose another --output")
    if not resume:
        return False
    if latest is None:
        print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from step 0", flush=True)
        return False
    old = ckpt.read_marker(ckpt_dir / latest).get("fingerprint") or {}
    if old.get("hash") != fp["hash"]:
        diff = [k for k in fp if k != "hash" and old.get(k) != fp[k]]
        raise ValueError(f"--resume: {out_dir} was fine-tuned with other settings ({', '.join(diff)}); "
                         "use the original arguments or another --output")
    return True


class SkipSampler(torch.utils.data.Sampler):
    """A sampler's order without its first ``skip`` indices: the rest of an interrupted epoch."""

    def __init__(self, base: torch.utils.data.Sampler) -> None:
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)


def train(engine, loader, sampler: SkipSampler, *, total_steps: int, grad_accum: int, world: int, rank: int,
          out_dir: Path, fp: dict, model_config_json: str, checkpoint_every: int, progress: Progress,
          evaluate: Optional[Callable[[int], Optional[dict]]] = None, eval_every: int = 0) -> bool:
    """Train from ``progress`` to ``total_steps``; True when a stop request ended it early (a
    checkpoint of the step reached is saved), False when training is done."""
    import deepspeed.comm as dist
    from tqdm.auto import tqdm

    from pretrain.stop import StopRequest

    device = engine.device
    p = progress
    stop = StopRequest(announce=rank == 0)
    flag = torch.zeros(1, device=device)
    micro_batch = loader.batch_size

    def save() -> None:
        client = {"progress": asdict(p), "fingerprint": fp}
        tag_dir = ckpt.save(engine, out_dir, p.step, client, model_config_json, keep=1)
        if rank == 0:
            tqdm.write(f"checkpoint: {tag_dir}")

    bar = tqdm(total=total_steps, initial=p.step, desc="train", disable=rank != 0)
    t0 = time.perf_counter()
    try:
        engine.train()
        while p.step < total_steps:
            sampler.set_epoch(p.epoch, skip=p.micro_in_epoch * micro_batch)
            for batch in loader:
                loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
                engine.backward(loss)
                engine.step()
                p.micro += 1
                p.micro_in_epoch += 1
                p.seen += len(batch["input_ids"]) * world
                if p.micro % grad_accum:
                    continue
                p.step += 1
                bar.update(1)
                if p.step % 10 == 0 or p.step == total_steps:  # .item() waits for the device: not every step
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{engine.get_lr()[0]:.2e}")
                if evaluate is not None and eval_every and p.step % eval_every == 0:
                    t_eval = time.perf_counter()
                    m = evaluate(p.step)
                    if m is not None:
                        p.eval_log.append(m)
                    t0 += time.perf_counter() - t_eval  # not training time
                requested = stop.poll()
                if world > 1:
                    flag.fill_(float(requested))
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    requested = flag.item() > 0
                if requested or (checkpoint_every and p.step % checkpoint_every == 0 and p.step < total_steps):
                    p.train_seconds += time.perf_counter() - t0
                    save()
                    t0 = time.perf_counter()
                if requested:
                    if rank == 0:
                        tqdm.write(f"fine-tuning stopped at step {p.step} of {total_steps} on request "
                                   f"({stop.reason or 'made on another rank'}); rerun with --resume to continue")
                    return True
                if p.step >= total_steps:
                    break
            if p.step < total_steps:
                p.epoch, p.micro_in_epoch = p.epoch + 1, 0
        p.train_seconds += time.perf_counter() - t0
        return False
    finally:
        bar.close()
        stop.restore()


def resume(engine, out_dir: Path, rank: int, world: int) -> Progress:
    client = ckpt.load_resume(engine, out_dir, announce=rank == 0)
    if client is None:
        raise ValueError(f"--resume: no checkpoint in {out_dir / 'checkpoints'} loads (see the messages above); "
                         "move them away to start over")
    progress = Progress(**client["progress"])
    if progress.world != world:  # the windows are split by rank: another world is another order
        raise ValueError(f"--resume: {out_dir} was fine-tuned on {progress.world} processes, not {world}; "
                         "resume with the same number")
    if rank == 0:
        print(f"resumed from {client['_tag']}: step {progress.step}, epoch {progress.epoch}", flush=True)
    return progress


def remove_checkpoints(out_dir: Path) -> None:
    """After a run has written its results its checkpoints are spent (``--save-model`` keeps the model)."""
    import shutil

    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
