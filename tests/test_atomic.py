"""data_prep.atomic, the one way the project writes outputs: complete or absent, never torn."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_prep import atomic

REPO = Path(__file__).resolve().parents[1]


def test_write_json_reads_back_and_leaves_no_temporary(tmp_path):
    atomic.write_json(tmp_path / "m.json", {"f1": 90.5, "answer": "Zürich"})
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == {"f1": 90.5, "answer": "Zürich"}
    assert "Zürich" in (tmp_path / "m.json").read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_an_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "latest"
    atomic.write_text(target, "step0000010")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("step00")  # half of the new content, then Ctrl-C
            raise KeyboardInterrupt
    assert target.read_text() == "step0000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_directory_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "hf"
    for files in ({"config.json": "1", "model.safetensors": "a"}, {"config.json": "2"}):
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            for name, text in files.items():
                (tmp / name).write_text(text)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing left of the first export
    assert (out / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_sigkill_while_writing_leaves_the_previous_version(tmp_path):
    """A real process killed mid-write (what the OOM killer does): readers see the old file."""
    target = tmp_path / "manifest.json"
    atomic.write_json(target, {"version": 1})
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from data_prep import atomic
        with atomic.atomic_path({str(target)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write('{{"version": 2, "pad": "')
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        leftovers = [p for p in tmp_path.iterdir() if p != target]
        assert len(leftovers) == 1 and ".tmp" in leftovers[0].name  # the write goes beside the target
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(target.read_text()) == {"version": 1}


def test_a_shard_is_absent_until_closed_and_discard_leaves_nothing(tmp_path):
    from data_prep import shardio

    w = shardio.ShardWriter(tmp_path / "shard_00000.bin", {"tokens": ("uint16", 4)})
    assert not (tmp_path / "shard_00000.bin").exists() and w.tmp.exists()
    w.append("tokens", [1, 2, 3, 4])
    w.close()
    arrays, _ = shardio.open_arrays(tmp_path / "shard_00000.bin")
    assert arrays["tokens"].tolist() == [1, 2, 3, 4]
    shardio.ShardWriter(tmp_path / "shard_00001.bin", {"tokens": ("uint16", 4)}).discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.bin"]
