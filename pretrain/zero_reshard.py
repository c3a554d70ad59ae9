"""Resume a ZeRO-1/2 checkpoint on another number of ranks: its optimizer state re-partitioned.

This module depends on DeepSpeed's PRIVATE ZeRO-1/2 state layout, which DeepSpeed may change in
any release; that is why requirements.txt pins ``deepspeed<0.20``. Everything that reads it is
here (``pretrain/checkpoint.py`` only calls :func:`saved_world`, :func:`partition_files`,
:func:`missing_partitions` and :func:`load_resharded`). It relies on:

* the file names ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (one per data-parallel
  rank) and ``dp_world_size`` in ``mp_rank_00_model_states.pt``;
* each partition file's ``optimizer_state_dict`` (``DeepSpeedZeroOptimizer.state_dict()``):
  ``base_optimizer_state`` (the torch optimizer's state dict, unless elastic_checkpoint),
  ``single_partition_of_fp32_groups`` (saved without its padding), ``group_paddings``,
  ``param_slice_mappings`` and ``partition_count``;
* the live ``deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer``'s attributes
  ``single_partition_of_fp32_groups``, ``round_robin_bit16_groups``, ``round_robin_bit16_offsets``,
  ``param_names`` and ``round_robin_gradients``, and its ``load_state_dict(state_dicts,
  load_optimizer_states=True, load_from_fp32_weights=True)`` taking this rank's entry of the list
  and copying its fp32 partition and optimizer state as they are.

When lifting the pin, read ``state_dict`` and ``_load_legacy_checkpoint`` of the new
``stage_1_and_2.py`` for changes to any of the above (a new per-rank or padded entry that
:func:`reshard_zero_state` would copy from rank 0 unchanged, a renamed key or file), then run
``tests/test_pretrain_unit.py -k "zero_state or partition"`` and the slow
``tests/test_pretrain_reshard.py`` (2 ranks -> 1 -> 2 under mpiexec, compared with a straight run);
both must pass before the new version is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def partition_files(tag_dir: Path, rank: Optional[int] = None) -> list[Path]:
    """The ZeRO optimizer partition files of a checkpoint, by rank (with ``rank``: that rank's)."""
    if rank is not None:
        return sorted(tag_dir.glob(f"*zero_pp_rank_{rank}_*"))
    files = list(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return sorted(files, key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))


def missing_partitions(tag_dir: Path, world: int) -> list[str]:
    """The names of the optimizer partition files of ``world`` ranks that ``tag_dir`` lacks."""
    prefix = "bf16_" if any(tag_dir.glob("bf16_zero_pp_rank_*")) else ""
    names = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return [name for name in names if not (tag_dir / name).is_file()]


def saved_world(tag_dir: Path) -> Optional[int]:
    """How many data-parallel ranks wrote a checkpoint's optimizer partitions (None: no partitions);
    a missing partition file is an error naming it (a resume on another world size reads them all)."""
    files = partition_files(tag_dir)
    if not files:
        return None
    model = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    world = len(files)
    if model:
        try:
            world = int(torch.load(model[0], map_location="cpu", weights_only=False, mmap=True).get("dp_world_size")
                        or world)
        except Exception:  # noqa: BLE001 - an unreadable model file is reported by the load itself
            pass
    missing = missing_partitions(tag_dir, world)
    if missing:
        raise FileNotFoundError(f"{tag_dir}: written by {world} ranks, partition file(s) missing: {', '.join(missing)}")
    return world


def load_resharded(engine, ckpt_dir: Path, tag: str, saved: int, load_lr_scheduler_states: bool = True) -> dict:
    """Load a checkpoint of ``saved`` ranks on another world size: DeepSpeed loads the model,
    scheduler and counters (it refuses the optimizer state of another world size), then each rank
    takes its new partition of every saved one (fp32 master weights, moments, step) through the
    ZeRO optimizer's own loader. Returns the client state."""
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from .config import ConfigError

    world = dist.get_world_size()
    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        raise ConfigError(f"{ckpt_dir / tag} was written by {saved} ranks and this launch has {world}: only "
                          f"ZeRO-1/2 optimizer state is re-partitioned here ({type(opt).__name__} is not); "
                          f"launch {saved} ranks, or use ZeRO stage 1 or 2 in both runs")
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=False,
                                       load_lr_scheduler_states=load_lr_scheduler_states)
    parts = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
             for f in partition_files(ckpt_dir / tag)]
    why = _layout_differs(parts, opt)
    if why:
        raise ConfigError(f"{ckpt_dir / tag} (written by {saved} ranks) cannot be re-partitioned onto {world}: {why}")
    sizes = [p.numel() for p in opt.single_partition_of_fp32_groups]
    try:
        mine = reshard_zero_state(parts, sizes, dist.get_rank(), world)
        opt.load_state_dict([mine] * world, load_optimizer_states=True, load_from_fp32_weights=True)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"{ckpt_dir / tag}: its optimizer state of {saved} ranks did not load onto {world} "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return client


def _layout_differs(parts: list[dict], opt) -> Optional[str]:
    """Why the saved partitions do not cut into the live optimizer's, or None. Each parameter's
    start in its group's flat vector is read from the partitions' slice mappings (rank k's
    fragments start at k * partition size) and must be where the live optimizer puts it: this
    refuses round_robin_gradients (its parameter order depends on the world size), DeepSpeed's
    elastic format, and another model or grouping."""
    if getattr(opt, "round_robin_gradients", False):
        return "zero_optimization.round_robin_gradients orders parameters by rank; turn it off to resume here"
    if any(not isinstance(p.get("base_optimizer_state"), dict) for p in parts):
        return "it was saved with zero_optimization.elastic_checkpoint, a format not read here"
    if any("param_slice_mappings" not in p for p in parts):
        return "its partitions carry no parameter map (saved by an older DeepSpeed)"
    for g, (params, offsets) in enumerate(zip(opt.round_robin_bit16_groups, opt.round_robin_bit16_offsets)):
        live = {opt.param_names[p]: off for p, off in zip(params, offsets)}
        pad = (parts[0].get("group_paddings") or [0] * (g + 1))[g]  # fp32 is saved without it
        size = parts[0]["single_partition_of_fp32_groups"][g].numel() + pad
        saved: dict[str, int] = {}
        for k, p in enumerate(parts):
            for name, frag in p["param_slice_mappings"][g].items():
                saved[name] = min(saved.get(name, k * size + frag.start), k * size + frag.start)
        if saved != live:
            moved = sorted(set(saved.items()) ^ set(live.items()))[:3]
            return f"parameter group {g} is laid out otherwise (e.g. {moved}): another model, grouping or ZeRO setting"
    return None


def reshard_zero_state(parts: list[dict], sizes: list[int], rank: int, world: int) -> dict:
    """Rank ``rank``'s ZeRO-1/2 optimizer state in a world of ``world`` ranks, cut from the state
    dicts ``parts`` that the ranks of another world saved (DeepSpeed's format, one per old rank).

    ZeRO-1/2 lay each parameter group out as one flat vector, parameters end to end (with any
    alignment padding ``zero_optimization.parameter_alignment`` asks for, which DeepSpeed checks
    on loading), and give rank r the slice [r * size, (r + 1) * size); only the padding at the
    end depends on the world size. So the old partitions end to end are the group, and the new
    slice is cut from them: the fp32 master weights and every per-element optimizer state (LAMB's
    moments, LARS's momentum) exactly; per-tensor entries (the step count) are copied.
    """
    first = parts[0]
    groups = len(first["single_partition_of_fp32_groups"])
    pads = [p.get("group_paddings") or [0] * groups for p in parts]
    # DeepSpeed saves each rank's fp32 partition without its padding (the moments with it): the
    # partition size is the saved fp32 length plus that rank's padding, the group's length the
    # partitions' less every padding
    n_old = [first["single_partition_of_fp32_groups"][g].numel() + pads[0][g] for g in range(groups)]
    length = [n * len(parts) - sum(pad[g] for pad in pads) for g, n in enumerate(n_old)]

    def cut(pieces: list[torch.Tensor], g: int) -> torch.Tensor:
        n, size = n_old[g], sizes[g]
        a, out = rank * size, torch.zeros(size, dtype=pieces[0].dtype)  # the new padding: zeros
        for k, piece in enumerate(pieces):
            lo, hi = max(a, k * n), min(a + size, k * n + piece.numel(), length[g])
            if lo < hi:
                out[lo - a:hi - a] = piece.reshape(-1)[lo - k * n:hi - k * n]
        return out

    base = first["base_optimizer_state"]
    state = {}
    for g, group in enumerate(base["param_groups"]):
        for idx in group["params"]:
            entry = {}
            for key, value in base["state"].get(idx, {}).items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == n_old[g]:
                    entry[key] = cut([p["base_optimizer_state"]["state"][idx][key] for p in parts], g)
                else:
                    entry[key] = value
            state[idx] = entry
    fp32 = [cut([p["single_partition_of_fp32_groups"][g] for p in parts], g) for g in range(len(sizes))]
    return dict(first, base_optimizer_state={"state": state, "param_groups": base["param_groups"]},
                single_partition_of_fp32_groups=fp32, partition_count=[world] * len(sizes),
                group_paddings=[min(size, max(0, (rank + 1) * size - n)) for size, n in zip(sizes, length)])
