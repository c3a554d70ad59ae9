"""The shard container: one file, a JSON header, then raw little-endian arrays.

Written by hand on purpose: training reads one sample as a couple of slices of memory-mapped
arrays, with no per-row decoding and no per-item library overhead, and any numpy reads it.
Arrow IPC would also memory-map, but adds a record-batch lookup per item and a pyarrow
dependency in every dataloader worker. See FORMAT.md for the byte layout.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from . import atomic

MAGIC = b"BERTSHD1"
ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(specs: Mapping[str, tuple[np.dtype, int]], meta: dict | None = None) -> tuple[bytes, dict]:
    """Header bytes and per-array (dtype, length, offset) for arrays of known sizes."""
    arrays = {}
    # The header length depends on the offsets, which depend on the header length: iterate.
    guess = 4096
    while True:
        offset = _align(16 + guess)
        arrays = {}
        for name, (dtype, length) in specs.items():
            dtype = np.dtype(dtype)
            arrays[name] = {"dtype": dtype.newbyteorder("<").str, "length": int(length), "offset": offset}
            offset = _align(offset + dtype.itemsize * int(length))
        header = json.dumps({"version": 1, "arrays": arrays, "meta": meta or {}}, sort_keys=True).encode()
        if len(header) <= guess:
            header = header + b" " * (guess - len(header))
            return MAGIC + struct.pack("<Q", len(header)) + header, arrays
        guess = _align(len(header) + 1024)


def total_size(arrays: dict) -> int:
    last = max(arrays.values(), key=lambda a: a["offset"]) if arrays else None
    if last is None:
        return 0
    return _align(last["offset"] + np.dtype(last["dtype"]).itemsize * last["length"])


class ShardWriter:
    """Pre-sizes a shard file and fills its arrays piece by piece (appends per array).

    Writes go to a temporary beside ``path`` (``atomic.temp_path``); ``close()`` fsyncs and renames it,
    so a shard is complete or absent; ``discard()`` drops an unfinished one.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[np.dtype, int]], meta: dict | None = None):
        self.path = Path(path)
        self.tmp = atomic.temp_path(self.path)
        header, self.arrays = layout(specs, meta)
        self.cursor = {name: 0 for name in self.arrays}
        with open(self.tmp, "wb") as f:
            f.write(header)
            f.truncate(total_size(self.arrays) or len(header))

    def append(self, name: str, values: np.ndarray) -> None:
        self.append_many({name: values})

    def append_many(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Append to several arrays with one open of the file."""
        with open(self.tmp, "r+b") as f:
            for name, values in arrays.items():
                spec = self.arrays[name]
                values = np.ascontiguousarray(values, dtype=np.dtype(spec["dtype"])).ravel()
                if self.cursor[name] + values.size > spec["length"]:
                    raise ValueError(f"{self.tmp}: array {name!r} overflows its declared length {spec['length']}")
                f.seek(spec["offset"] + self.cursor[name] * values.itemsize)
                f.write(values.tobytes())
                self.cursor[name] += values.size

    def close(self) -> str:
        """Check every array is full, make the file durable, rename it into place; returns sha256."""
        for name, spec in self.arrays.items():
            if self.cursor[name] != spec["length"]:
                raise ValueError(f"{self.tmp}: array {name!r} has {self.cursor[name]} of {spec['length']} values")
        digest = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        atomic.commit(self.tmp, self.path, durable=True)
        return digest.hexdigest()

    def discard(self) -> None:
        atomic.discard(self.tmp)


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: dict | None = None) -> str:
    """Write whole in-memory arrays as one shard (atomic); returns sha256."""
    w = ShardWriter(path, {k: (np.asarray(v).dtype, np.asarray(v).size) for k, v in arrays.items()}, meta)
    for k, v in arrays.items():
        w.append(k, np.asarray(v).ravel())
    return w.close()


def read_header(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a data_prep shard (magic {magic!r}, expected {MAGIC!r})")
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def open_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-map every array of a shard read-only; returns (arrays, meta)."""
    header = read_header(path)
    # One map per file (not per array): each mmap holds a file descriptor.
    size = os.path.getsize(path)
    # np.asarray: a plain ndarray view of the map (slicing a np.memmap subclass is ~3x slower)
    whole = np.asarray(np.memmap(path, dtype=np.uint8, mode="r")) if size else np.zeros(0, np.uint8)
    out = {}
    for name, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"])
        start, stop = spec["offset"], spec["offset"] + dtype.itemsize * spec["length"]
        if stop > size:
            raise ValueError(f"{path}: truncated file (array {name!r} ends at byte {stop}, file has {size})")
        out[name] = whole[start:stop].view(dtype) if spec["length"] else np.zeros(0, dtype)
    return out, header.get("meta", {})

