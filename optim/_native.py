"""Build (once, cached) and call the C kernels in ``csrc/layerwise_cpu.c`` through ctypes.

The library is compiled with the machine's C compiler on first use (about a second) into a
cache directory keyed by the source, the compiler flags and the CPU's feature flags, so a cache
shared between machines never hands one CPU code built for another. Writes are atomic, so ranks
that start together may all build without harm. When no compiler is available the fused path
reports itself unavailable and the optimizers fall back to the multi-tensor path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_SOURCE = Path(__file__).with_name("csrc") / "layerwise_cpu.c"
# -fno-math-errno lets sqrtf vectorise (it does not change results); no -ffast-math, which would.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=gnu99"]
_BLOCK = 1 << 15  # elements per work item: 4 arrays x 128 KiB stay in L2

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None


class LambHparams(ctypes.Structure):
    _fields_ = [
        ("beta1", ctypes.c_float), ("beta2", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float), ("one_minus_beta2", ctypes.c_float), ("grad_scale", ctypes.c_float),
        ("inv_bc1", ctypes.c_float), ("inv_bc2", ctypes.c_float), ("eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float), ("eps_inside_sqrt", ctypes.c_int32),
    ]


def _cpu_signature() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def _cache_dir() -> Path:
    root = os.environ.get("BIGBATCH_BERT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bigbatch_bert"
    )
    return Path(root)


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"layerwise_cpu_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{compiler} failed on {_SOURCE}:\n{proc.stderr.strip()}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.lamb_pass1.argtypes = [i64, p, p, p, p, p, p, p, p, p, p, ctypes.POINTER(LambHparams), ctypes.c_int]
    lib.lamb_pass2.argtypes = [i64, p, p, p, p, p, p, p, ctypes.POINTER(LambHparams), ctypes.c_int]
    lib.lamb_apply.argtypes = [i64, p, p, p, p, p, p, ctypes.c_int]
    lib.sumsq2.argtypes = [i64, p, p, p, p, p, p, p, ctypes.c_float, ctypes.c_int]
    lib.lars_pass2.argtypes = [i64, p, p, p, p, p, p, p, ctypes.c_float, ctypes.c_float,
                               ctypes.c_float, ctypes.c_int]
    for fn in (lib.lamb_pass1, lib.lamb_pass2, lib.lamb_apply, lib.sumsq2, lib.lars_pass2):
        fn.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, or ``None`` when it cannot be built here (see :func:`error`)."""
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _build()
                except (OSError, RuntimeError) as exc:  # no compiler, read-only cache, ...
                    _error = str(exc)
    return _lib


def error() -> Optional[str]:
    return _error


def supports(tensors: list[torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


class BlockPlan:
    """Fixed work split of a list of segments into blocks of at most ``_BLOCK`` elements."""

    def __init__(self, seg_tensor: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray,
                 block: int = _BLOCK) -> None:
        nblk_per_seg = np.maximum((seg_len + block - 1) // block, 1)
        seg_of_blk = np.repeat(np.arange(len(seg_len)), nblk_per_seg)
        first_blk = np.cumsum(nblk_per_seg) - nblk_per_seg
        offset = (np.arange(len(seg_of_blk)) - first_blk[seg_of_blk]) * block
        self.seg = torch.from_numpy(seg_of_blk.astype(np.int64))
        self.tensor = np.ascontiguousarray(seg_tensor[seg_of_blk], dtype=np.int64)
        self.start = np.ascontiguousarray(seg_start[seg_of_blk] + offset, dtype=np.int64)
        self.len = np.ascontiguousarray(
            np.minimum(seg_len[seg_of_blk] - offset, block).clip(min=0), dtype=np.int64)
        self.nblk = len(seg_of_blk)

    def args(self) -> tuple:
        return (self.nblk, self.tensor.ctypes.data, self.start.ctypes.data, self.len.ctypes.data)


def pointers(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=len(tensors))


def num_threads() -> int:
    return max(1, torch.get_num_threads())
