"""The project's one way to write an output file or directory: complete or absent, never half-written.

Every writer goes through here: data_prep's shards, work pieces, manifests and vocab; pretraining's
checkpoint files, metrics and exported models; fine-tuning's predictions and metrics. Content is
written under a temporary name beside the target (same file system, so the rename is atomic) and
renamed onto it only once whole; a crash or an exception leaves the old target (or none) and no
temporary behind, and a reader (a resumed run, an evaluation) never sees a torn file.

    with atomic_path(out / "predictions.json") as tmp:   # write anything to tmp
        tmp.write_text(...)
    write_text(path, text); write_json(path, obj)         # the common cases

Streaming writers that outlive one ``with`` block (shard writers) use ``temp_path``, ``commit`` and
``discard`` directly. (``optim`` keeps its own compile-cache rename: it depends on no other package
of the project.)
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` (hidden, unique per process); ``*.tmp*`` finds leftovers."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary file or directory, if any."""
    tmp = Path(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def commit(tmp: str | os.PathLike, path: str | os.PathLike, durable: bool = False) -> None:
    """Rename a finished temporary onto ``path``. ``durable`` fsyncs a file first (shards: survive a
    power loss, not only a crash). A directory replaces an existing one (removed first)."""
    tmp, path = Path(tmp), Path(path)
    if durable and tmp.is_file():
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write (a file, or a directory the caller creates); on a clean exit
    it becomes ``path``, on an exception (Ctrl-C included) it is removed and ``path`` is untouched."""
    tmp = temp_path(path)
    discard(tmp)  # a leftover of a crashed process that had our pid
    try:
        yield tmp
        commit(tmp, path, durable)
    except BaseException:
        discard(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj, **dump_kwargs) -> None:
    """``obj`` as UTF-8 JSON (``indent=1`` unless told otherwise), newline-terminated."""
    dump_kwargs.setdefault("indent", 1)
    dump_kwargs.setdefault("ensure_ascii", False)
    write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """A matplotlib figure written as ``path`` (format from its suffix) in one rename."""
    kwargs.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
