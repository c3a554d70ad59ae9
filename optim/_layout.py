"""Where each model tensor lives inside the tensors an optimizer is asked to step.

Layer-wise optimizers (LAMB, LARS) need one norm per *model tensor*. Without wrappers, every
tensor in ``param_groups`` is a model tensor. DeepSpeed's ZeRO-1/2 and bf16 optimizers instead
hand the inner optimizer one flat fp32 tensor per param group (per rank), holding slices
("segments") of many model tensors, some of which continue on another rank. A :class:`FlatLayout`
records those segments so the optimizer can sum squares per segment, add the partial sums of
all ranks in one collective, and apply exact per-tensor trust ratios.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class FlatLayout:
    """Segments of model tensors inside one flat tensor.

    ``keys[i]`` is the index of the model tensor (in ``names``/the owner's numbering) whose
    elements ``[starts[i], starts[i] + lengths[i])`` of the flat tensor belong to it. Elements not
    covered (alignment padding) are left untouched by the step.
    ``process_group`` is the data-parallel group across which the segments of one model tensor
    are spread (``None``: this flat tensor holds whole tensors, nothing to reduce).
    """

    keys: list[int]
    starts: list[int]
    lengths: list[int]
    process_group: Optional[object] = None
    partitioned: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.starts) == len(self.lengths)):
            raise ValueError("FlatLayout: keys, starts and lengths must have the same length")

    def views(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """1-D views of ``tensor`` for every segment (cached per storage address)."""
        flat = tensor.view(-1)
        ptr = (flat.data_ptr(), flat.numel())
        cached = self._cache.get(ptr)
        if cached is None:
            if len(self._cache) > 16:  # tensors re-allocated every step (e.g. ZeRO grads)
                self._cache.clear()
            cached = [flat.narrow(0, s, n) for s, n in zip(self.starts, self.lengths)]
            self._cache[ptr] = cached
        return cached


def whole_tensor_layout(key: int, numel: int) -> FlatLayout:
    return FlatLayout(keys=[key], starts=[0], lengths=[numel])
