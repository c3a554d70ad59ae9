"""Checkpoints: DeepSpeed's engine state plus ours, complete or absent, last K kept.

Layout of ``OUTPUT/checkpoints``::

    step0000200/            DeepSpeed files (model, ZeRO optimizer partitions, scheduler)
        client_state in DeepSpeed's model file: step, samples, sampler position, config hash
        rng_rank{r}.pt      each rank's RNG states (dropout), for a bitwise resume
        model_config.json   the BertConfig, so the checkpoint exports on its own
        complete.json       written last, once every rank has finished: each file's size
    latest                  name of the newest complete checkpoint (a convenience for humans)

A checkpoint is *complete* when its ``complete.json`` exists and every file it lists has the
size it records. Only complete checkpoints are resumed from, exported or pruned, and they are
found by listing the directory, not through ``latest``: a missing, empty or stale ``latest``, a
checkpoint directory deleted by hand, or a file truncated by a full disk makes a resume fall back
to the newest complete checkpoint (saying so), never start over and prune the good ones. An
unfinished save (no ``complete.json``, newer than every complete checkpoint) is removed by the next
save.

Rank 0 reads the directory and decides (which checkpoint to resume from, whether a step is saved
already) and broadcasts its answer: on a shared filesystem with client-side caching (NFS) the
ranks of a quickly requeued job can list different newest checkpoints, and ranks that each
decided alone would load different steps, or wait for each other in different collectives.

Resuming on another number of ranks re-partitions ZeRO-1/2 optimizer state: that reads
DeepSpeed's private layout and lives in ``pretrain/zero_reshard.py``.
"""
from __future__ import annotations

import json
import random
import resource
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data_prep.atomic import atomic_path, write_text

from .zero_reshard import load_resharded, missing_partitions, partition_files, saved_world

TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


MARKER = "complete.json"


def step_of(tag: str) -> Optional[int]:
    if tag.startswith(TAG_PREFIX) and tag[len(TAG_PREFIX):].isdigit():
        return int(tag[len(TAG_PREFIX):])
    return None


def _legacy_complete(tag_dir: Path) -> bool:
    """A checkpoint of a version before complete.json: the ``latest`` file, replaced only after
    every rank had written, names it or a newer checkpoint of that era."""
    latest_file = tag_dir.parent / "latest"
    try:
        latest = latest_file.read_bytes().decode("utf-8", "replace").strip()  # damaged: any bytes
    except OSError:
        return False
    return (step_of(latest) is not None and (tag_dir.parent / latest).is_dir()
            and not (tag_dir.parent / latest / MARKER).is_file() and tag_dir.name <= latest
            and any(tag_dir.glob("*model_states.pt")))


def unfinished(tag_dir: Path) -> bool:
    """A save that never completed (no complete.json, and not a complete checkpoint of an older
    version): nothing in it can be trusted, and the next save removes it."""
    return not (tag_dir / MARKER).is_file() and not _legacy_complete(tag_dir)


def check_complete(tag_dir: Path) -> Optional[str]:
    """None when ``tag_dir`` is a complete checkpoint, else why it is not."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return None if _legacy_complete(tag_dir) else f"{tag_dir.name} is unfinished (no {MARKER})"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{tag_dir.name}/{MARKER} is unreadable"
    for name, size in sizes.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{tag_dir.name}/{name} is missing"
        if f.stat().st_size != size:
            return f"{tag_dir.name}/{name} is truncated or changed ({f.stat().st_size} of {size} bytes)"
    return None


def checkpoint_dirs(ckpt_dir: Path) -> list[str]:
    """Every checkpoint directory (complete or not), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None)


def complete_tags(ckpt_dir: Path, report=None) -> list[str]:
    """Complete checkpoints, oldest first; ``report(message)`` hears why others are skipped."""
    out = []
    for tag in checkpoint_dirs(ckpt_dir):
        why = check_complete(ckpt_dir / tag)
        if why is None:
            out.append(tag)
        elif report is not None:
            report(why)
    return out


def latest_tag(ckpt_dir: Path, report=None) -> Optional[str]:
    """The newest complete checkpoint (whatever the ``latest`` file says)."""
    tags = complete_tags(ckpt_dir, report)
    return tags[-1] if tags else None


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run output dir, a checkpoints dir or one checkpoint dir."""
    path = Path(path)
    for ckpt_dir in (path / "checkpoints", path):
        tag = latest_tag(ckpt_dir)
        if tag:
            return ckpt_dir, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        why = check_complete(path) if (path / MARKER).is_file() else None
        if why:
            raise FileNotFoundError(f"{path}: incomplete checkpoint: {why}")
        return path.parent, path.name
    for ckpt_dir in (path / "checkpoints", path):
        dirs = checkpoint_dirs(ckpt_dir)
        if dirs:
            reasons = [check_complete(ckpt_dir / t) for t in dirs]
            raise FileNotFoundError(f"{path}: no complete checkpoint: " + "; ".join(r for r in reasons[::-1][:3] if r))
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (expected OUTPUT/checkpoints/stepNNNNNNN, a "
                            "checkpoints dir, or a checkpoint directory)")


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


def read_marker(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def from_rank0(value, device):
    """Rank 0's ``value`` on every rank (what rank 0 read of the checkpoint directory decides)."""
    import deepspeed.comm as dist

    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def saved_already(tag_dir: Path, device) -> bool:
    """Whether ``tag_dir`` is a complete checkpoint, as rank 0 sees it, on every rank."""
    import deepspeed.comm as dist

    mine = dist.get_rank() == 0 and tag_dir.is_dir() and check_complete(tag_dir) is None
    return bool(from_rank0(mine, device))


class SaveFailed(RuntimeError):
    """A checkpoint could not be written on some rank; raised on every rank, nothing marked
    complete. ``str()`` is the one line to print, on the first failing rank only (empty elsewhere)."""


def save_failure(tag_dir: Path, exc: BaseException) -> str:
    """One line naming the checkpoint and the cause: torch.save's own error ('unexpected pos')
    names neither the file nor why."""
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        free = shutil.disk_usage(tag_dir.parent).free
    except OSError:
        free = None
    if limit != resource.RLIM_INFINITY:
        hint = f"file size limit {limit:,} bytes, ulimit -f"
    elif free is not None and free < 64 << 20:
        hint = f"disk full: {free:,} bytes free"
    else:
        hint = "disk full or file size limit?"
    return f"checkpoint save to {tag_dir} failed: {type(exc).__name__}: {what} ({hint})"


def save(engine, output: Path, step: int, client_state: dict, model_config_json: str, keep: int,
         rng: Optional[dict] = None) -> Path:
    """Write checkpoint ``step`` on every rank; rank 0 then marks it complete and prunes. ``rng``:
    the RNG states to record (default: the current ones; a stop mid-step saves those of its start).

    A write that fails on any rank (disk full, file size limit) raises :class:`SaveFailed` on
    every rank, with no rank left waiting in a collective: the ranks agree on the outcome where
    they used to wait for each other's files."""
    import deepspeed.comm as dist

    ckpt_dir = output / "checkpoints"
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    if saved_already(tag_dir, engine.device):
        return tag_dir  # this step is saved already (a run resumed here and stopped again)
    if rank == 0 and tag_dir.is_dir():  # an unfinished save of this step from a run that died
        shutil.rmtree(tag_dir)
    dist.barrier()
    failed = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as exc:  # torch.save's writer raises RuntimeError on a short write
        failed = save_failure(tag_dir, exc)
        # DeepSpeed's save ends in a barrier the ranks that wrote their files wait in; the writes
        # are the last thing before it, so this rank, having skipped it, joins it here.
        dist.barrier()
    if failed is None:
        try:
            with atomic_path(tag_dir / f"rng_rank{rank}.pt") as tmp:
                torch.save(rng if rng is not None else rng_state(), tmp)
            if rank == 0:
                write_text(tag_dir / "model_config.json", model_config_json)
        except (OSError, RuntimeError) as exc:
            failed = save_failure(tag_dir, exc)
    # Every rank's files are on disk, or the first rank that failed says why (one line, not N).
    world = dist.get_world_size()
    first = torch.tensor([float(rank if failed else world)], device=engine.device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if first.item() < world:
        raise SaveFailed(failed if int(first.item()) == rank else "")
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MARKER
                 and not p.name.startswith(".")}
        marker = {"step": step, "files": files, "fingerprint": client_state.get("fingerprint")}
        write_text(tag_dir / MARKER, json.dumps(marker, indent=1, default=str))
        write_text(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older complete ones and unfinished
    saves. A checkpoint with complete.json whose files no longer match it (truncated later, by a
    full disk or by hand) is left alone: that is for a person to look at."""
    complete = complete_tags(ckpt_dir)
    if not complete:
        return
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [t for t in checkpoint_dirs(ckpt_dir) if t not in complete and unfinished(ckpt_dir / t)]
    for t in doomed:
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def load_resume(engine, output: Path, announce: bool = True) -> Optional[dict]:
    """Restore the newest complete checkpoint of this run that loads (engine, RNG); returns its
    client state. Checkpoints that are incomplete or fail to load are skipped with a message.

    A checkpoint written by another number of ranks (a preempted job requeued on fewer or more
    nodes) is loaded through :mod:`pretrain.zero_reshard`: ZeRO-1/2 optimizer state re-partitioned
    exactly; ``client["_saved_world"]`` then holds the old world size, so the caller converts the
    sampler position (``data_prep``'s sampler does) and says so."""
    import deepspeed.comm as dist

    ckpt_dir = output / "checkpoints"
    say = (lambda m: print(f"resume: skipping {m}", file=sys.stderr, flush=True)) if announce else None
    rank, world = dist.get_rank(), dist.get_world_size()
    for tag, saved in resume_candidates(ckpt_dir, engine.device, say):
        # Each rank opens its own files first (memory-mapped: cheap), all partitions when the world
        # size changed; every rank must agree before DeepSpeed's load, which runs collectives a
        # failing rank would leave the others waiting in.
        reshard = saved not in (None, world)
        why = _unreadable(ckpt_dir / tag, rank, every_partition=reshard)
        failed = torch.tensor([0.0 if why is None else 1.0], device=engine.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() > 0:
            if say:
                say(f"{tag}: {why or 'a file of another rank does not open'}")
            continue
        if reshard:
            client = load_resharded(engine, ckpt_dir, tag, saved)
        else:
            _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if client is None:
            raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed found no state in it")
        rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        client["_tag"] = tag
        if reshard:
            client["_saved_world"] = saved
        if announce:
            note = stale_latest(ckpt_dir, tag)
            if note:
                print(f"resume: {note}; resuming from {tag}, the newest complete checkpoint", file=sys.stderr,
                      flush=True)
        return client
    return None


def resume_candidates(ckpt_dir: Path, device, report=None) -> list[tuple[str, Optional[int]]]:
    """(tag, world size that wrote it) of every complete checkpoint, newest first, as rank 0 lists
    them, on every rank. ``report`` (rank 0's) hears why others are skipped."""
    import deepspeed.comm as dist

    found = []
    if dist.get_rank() == 0:
        for tag in reversed(complete_tags(ckpt_dir, report)):
            try:
                found.append((tag, saved_world(ckpt_dir / tag)))
            except FileNotFoundError as exc:
                if report is not None:
                    report(f"{tag}: {str(exc).split(': ', 1)[1]}")
    return from_rank0(found, device)


def stale_latest(ckpt_dir: Path, tag: str) -> Optional[str]:
    """Why the ``latest`` file does not name ``tag`` (missing, empty, naming a checkpoint that is
    gone or was skipped), or None when it does."""
    try:
        named = (ckpt_dir / "latest").read_bytes().decode("utf-8", "replace").strip()  # damaged: any bytes
    except FileNotFoundError:
        return f"{ckpt_dir / 'latest'} is missing"
    except OSError as exc:
        return f"{ckpt_dir / 'latest'} is unreadable ({exc.strerror})"
    if named == tag:
        return None
    if not named:
        return f"{ckpt_dir / 'latest'} is empty"
    if step_of(named) is None:
        return f"{ckpt_dir / 'latest'} names {named[:40]!r}, not a checkpoint"
    if not (ckpt_dir / named).is_dir():
        return f"{ckpt_dir / 'latest'} names {named}, which does not exist (deleted?)"
    return f"{ckpt_dir / 'latest'} names {named}, which was skipped"


def _unreadable(tag_dir: Path, rank: int, every_partition: bool = False) -> Optional[str]:
    """None when this rank's files of the checkpoint open (with ``every_partition``: all ranks'
    optimizer partitions, which a resume on another world size reads), else why not."""
    partitions = partition_files(tag_dir, None if every_partition else rank)
    for f in sorted(tag_dir.glob("mp_rank_*_model_states.pt")) + partitions:
        try:
            torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:  # noqa: BLE001
            return f"{f.name} does not open ({type(exc).__name__}: {str(exc)[:150]})"
    return None


def restore_phase1_optimizer(engine, ckpt_dir: Path, tag: str, mode: str) -> None:
    """Phase 2 from phase 1: the engine's weights and, per ``mode``, the optimizer state.

    ``keep``: LAMB's moments, with the step count restarted (bias correction from t = 1), as
    NVIDIA's phase 2; ``keep_step``: moments and step count as phase 1 left them. Either way
    the learning rate, schedule and hyperparameters are phase 2's own (loading the optimizer
    also restores phase 1's param-group settings, among them its last learning rate, often 0)
    and the engine's step counters start from 0. Phase 1 may have run on another number of ranks
    (ZeRO-1/2 state is re-partitioned as on a resume).
    """
    import deepspeed.comm as dist

    from .config import ConfigError

    own = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    saved = saved_world(ckpt_dir / tag)
    try:
        if saved is None or saved == dist.get_world_size():
            engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            load_resharded(engine, ckpt_dir, tag, saved, load_lr_scheduler_states=False)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's ZeRORuntimeException is none of the usual kinds
        raise ConfigError(
            f"cannot restore the optimizer state of {ckpt_dir / tag} ({type(exc).__name__}: {str(exc)[:200]}); "
            "phase 2 must keep phase 1's ZeRO stage, or set pretrain.init_optimizer_state to \"reset\"") from None
    for group, settings in zip(engine.optimizer.param_groups, own):
        group.update(settings)
    if mode == "keep":
        inner = getattr(engine, "basic_optimizer", None) or engine.optimizer
        for state in inner.state.values():
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
    engine.global_steps = engine.global_samples = engine.skipped_steps = 0


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full-precision model weights of a DeepSpeed checkpoint (any ZeRO stage, any world size).

    ZeRO checkpoints hold the fp32 master weights in the optimizer partitions; they are merged,
    and a missing or broken partition is an error naming the file, never a silent fall-back to
    the 16-bit weights. Without ZeRO the model file holds the weights (in the precision the model
    trained in; DeepSpeed's bf16 optimizer of stage 0 writes ``bf16_zero_pp_rank_*`` files that
    are not ZeRO partitions).
    """
    tag_dir = ckpt_dir / tag
    if (tag_dir / MARKER).is_file():
        why = check_complete(tag_dir)
        if why:
            raise FileNotFoundError(f"{ckpt_dir}: checkpoint {why}")
    model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{tag_dir}: no mp_rank_*_model_states.pt; not a DeepSpeed checkpoint")
    try:  # memory-mapped: only the small entries are read unless the weights are needed
        states = torch.load(model_files[0], map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{model_files[0]}: unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
                         "the file may be truncated") from None
    stage = int(((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    if stage >= 1:
        world = int(states.get("dp_world_size") or 1)
        missing = missing_partitions(tag_dir, world)
        if missing:
            raise FileNotFoundError(f"{tag_dir}: ZeRO-{stage} checkpoint of {world} ranks, partition file(s) "
                                    f"missing: {', '.join(missing)}")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as exc:  # noqa: BLE001 - name the checkpoint and the cause, no traceback
            raise ValueError(f"{tag_dir}: cannot merge the ZeRO partitions into fp32 weights "
                             f"({type(exc).__name__}: {str(exc)[:300]}); a file may be truncated") from None
    return {k: v.float() for k, v in states["module"].items()}
