"""The fine-tuning loop, with nothing lost on a stop: checkpoints every ``--checkpoint-every``
steps, at the end of training and at the step after a stop request; ``--resume`` goes on from
the newest.

A stop request is what pretraining answers (:mod:`pretrain.stop`): SIGTERM, SIGINT (Ctrl-C),
SIGUSR1 (Slurm's warning), or the death of the launcher above the rank. Ranks agree on it through
one one-element all-reduce per step whose result is read a step later (the device has finished
it by then: no wait), so every rank saves the same step, one step after the request. The
checkpoint (:mod:`pretrain.checkpoint`'s layout: DeepSpeed's engine with AdamW and the schedule,
each rank's RNG, a completion marker) also holds the loop's position: step, micro-batches, epoch
and micro-batches into it, windows seen, training seconds, the evaluations so far and one that
was due when the stop came. A resumed run skips the windows already trained on in that epoch's
order and restores the RNG, so on a deterministic device it repeats the uninterrupted run exactly.

What decides the training is fingerprinted (arguments, the training file's and the DeepSpeed
config's contents): ``--resume`` with other ones, or on another number of ranks, is refused
before anything loads; ``--resume`` of a run that has finished does nothing.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pretrain import checkpoint as ckpt
from pretrain.distributed import launcher_rank

# Arguments whose change makes a resumed run another run (files: by content, below).
RESUME_ARGS = ("checkpoint", "max_train_examples", "version_2", "max_seq_length", "doc_stride", "max_query_length",
               "epochs", "max_steps", "lr", "batch_size", "grad_accum", "warmup", "weight_decay", "seed", "bf16")


@dataclass
class Progress:
    step: int = 0             # optimizer steps done
    micro: int = 0            # micro-batches done (this rank): accumulation runs across epochs
    epoch: int = 0            # the epoch under way
    micro_in_epoch: int = 0   # micro-batches of that epoch done (this rank)
    seen: int = 0             # training windows seen, all ranks
    train_seconds: float = 0.0
    eval_log: list = field(default_factory=list)
    eval_pending: bool = False  # the stop came at a step due for evaluation: the resume does it first
    world: int = 1            # ranks: each trains its share of the windows, in an order per rank


def _sha256(path: str) -> Optional[str]:
    """The file's content hash (None when it is missing: reading it later names the problem)."""
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(args) -> dict:
    picked = {k: getattr(args, k) for k in RESUME_ARGS}
    picked["checkpoint"] = str(Path(args.checkpoint).resolve())
    picked["train_file"] = _sha256(args.train_file)
    picked["config"] = _sha256(args.config)
    picked["hash"] = hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return picked


def check_output(out_dir: Path, resume: bool, fp: dict) -> str:
    """"fresh", "resume" or "done" (``--resume`` of a run whose results are written). Refused
    (ValueError): checkpoints present without ``--resume``, ``--resume`` with other settings."""
    ckpt_dir = out_dir / "checkpoints"
    present = ckpt.checkpoint_dirs(ckpt_dir)
    latest = ckpt.latest_tag(ckpt_dir)
    if present and not resume:
        raise ValueError(f"{out_dir} holds checkpoints of an unfinished fine-tuning run (latest "
                         f"{latest or 'none complete'}): pass --resume to continue it, or choose another --output")
    if not resume:
        return "fresh"
    old = ckpt.read_marker(ckpt_dir / latest).get("fingerprint") if latest else None
    if old is None and not present and (out_dir / "metrics.json").is_file():
        old = json.loads((out_dir / "metrics.json").read_text()).get("fingerprint")
        if old is not None and old.get("hash") == fp["hash"]:
            return "done"
    if old is None:
        if launcher_rank() == 0:
            print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from step 0", flush=True)
        return "fresh"
    if old.get("hash") != fp["hash"]:
        diff = [k for k in fp if k not in ("hash", "world") and old.get(k) != fp[k]]
        raise ValueError(f"--resume: {out_dir} was fine-tuned with other settings ({', '.join(diff)}); "
                         "use the original arguments and files, or another --output")
    return "resume"


def check_world(out_dir: Path, world: int) -> None:
    """The windows are split by rank: a resume on another number of ranks is another order."""
    latest = ckpt.latest_tag(out_dir / "checkpoints")
    saved = (ckpt.read_marker(out_dir / "checkpoints" / latest).get("fingerprint") or {}).get("world") if latest else None
    if saved is not None and saved != world:
        raise ValueError(f"--resume: {out_dir} was fine-tuned on {saved} processes, not {world}; "
                         "resume with the same number")


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


class StopAgreement:
    """Whether every rank stops after this step: the local requests of the step before, max-reduced
    (the step's own reduction is read one step later, when the device has long finished it; at
    the last step at once)."""

    def __init__(self, world: int, device) -> None:
        self.world, self.device, self.pending = world, device, None

    def __call__(self, requested: bool, last: bool) -> bool:
        if self.world == 1:
            return requested
        import deepspeed.comm as dist

        flag = torch.tensor([float(requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        read, self.pending = (flag, None) if last else (self.pending, flag)
        return read is not None and read.item() > 0


def train(engine, loader, sampler: SkipSampler, *, total_steps: int, grad_accum: int, world: int, rank: int,
          out_dir: Path, fp: dict, model_config_json: str, checkpoint_every: int, progress: Progress,
          evaluate: Optional[Callable[[int], Optional[dict]]] = None, eval_every: int = 0) -> bool:
    """Train from ``progress`` to ``total_steps``; True when a stop request ended it first (a
    checkpoint of the step reached is saved), False when training is done (saved too, unless
    ``checkpoint_every`` is 0: a stop during the prediction then loses only the prediction)."""
    from tqdm.auto import tqdm

    from pretrain.stop import StopRequest

    p = progress
    stop = StopRequest(announce=rank == 0)
    agree = StopAgreement(world, engine.device)
    micro_batch = loader.batch_size
    t0 = time.perf_counter()

    def save() -> None:
        nonlocal t0
        p.train_seconds += time.perf_counter() - t0
        tag_dir = ckpt.save(engine, out_dir, p.step, {"progress": asdict(p), "fingerprint": dict(fp, world=world)},
                            model_config_json, keep=1)
        t0 = time.perf_counter()
        if rank == 0:
            tqdm.write(f"checkpoint: {tag_dir}")

    def run_eval() -> None:
        nonlocal t0
        t = time.perf_counter()
        m = evaluate(p.step)
        if m is not None:
            p.eval_log.append(m)
        t0 += time.perf_counter() - t  # not training time

    bar = tqdm(total=total_steps, initial=p.step, desc="train", disable=rank != 0)
    try:
        engine.train()
        if p.eval_pending:
            run_eval()
            p.eval_pending = False
        while p.step < total_steps:
            sampler.set_epoch(p.epoch, skip=p.micro_in_epoch * micro_batch)
            for batch in loader:
                loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
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
                eval_due = evaluate is not None and eval_every > 0 and p.step % eval_every == 0
                if agree(stop.poll(), last=p.step == total_steps):
                    p.eval_pending = eval_due  # a stop does not wait for an evaluation
                    save()
                    if rank == 0:
                        tqdm.write(f"fine-tuning stopped at step {p.step} of {total_steps} on request "
                                   f"({stop.reason or 'made on another rank'}); rerun with --resume to continue")
                    return True
                if eval_due:
                    run_eval()
                if checkpoint_every and (p.step % checkpoint_every == 0 or p.step == total_steps):
                    save()
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
    if rank == 0:
        print(f"resumed from {client['_tag']}: step {progress.step}, epoch {progress.epoch}", flush=True)
    return progress


def remove_checkpoints(out_dir: Path) -> None:
    """Once a run's results are written its checkpoints are spent (``--save-model`` keeps the model)."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
