"""Which checkpoint directories count, without DeepSpeed: complete ones (complete.json with the
sizes of the files), complete ones of the version before the marker (named by ``latest``), and
unfinished saves, which are removed by the next save."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain import checkpoint
from pretrain.config import ConfigError, PretrainConfig


def make(ckpt: Path, step: int, marker: bool = True) -> Path:
    d = ckpt / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"m" * 10)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 20)
    if marker:
        files = {p.name: p.stat().st_size for p in d.iterdir()}
        (d / checkpoint.MARKER).write_text(json.dumps({"step": step, "files": files}))
    return d


def test_checkpoints_of_the_version_before_the_marker_still_count(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        make(ckpt, s, marker=False)
    (ckpt / "latest").write_text("step0000004")  # 6 was being written when the run died
    assert checkpoint.complete_tags(ckpt) == ["step0000002", "step0000004"]
    assert checkpoint.unfinished(ckpt / "step0000006")
    checkpoint.prune(ckpt, keep=1)
    assert checkpoint.checkpoint_dirs(ckpt) == ["step0000004"]  # the older one pruned, the unfinished gone


def test_prune_removes_unfinished_saves_and_leaves_damaged_ones_for_a_person(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make(ckpt, 2)
    make(ckpt, 4, marker=False)                     # unfinished: garbage
    damaged = make(ckpt, 6)
    (damaged / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o")  # truncated later
    make(ckpt, 8)
    checkpoint.prune(ckpt, keep=3)
    assert checkpoint.checkpoint_dirs(ckpt) == ["step0000002", "step0000006", "step0000008"]
    assert checkpoint.latest_tag(ckpt) == "step0000008"
    assert "truncated or changed (1 of 20 bytes)" in checkpoint.check_complete(damaged)


def test_resume_over_unfinished_saves_only_starts_over_and_otherwise_refuses(tmp_path, capsys):
    from pretrain.run import check_output

    out = tmp_path / "run"
    cfg = PretrainConfig(data="d", output=str(out))
    args = SimpleNamespace(resume=True)
    make(out / "checkpoints", 10, marker=False)
    assert check_output(args, cfg, {}, {}) is False
    assert "only unfinished saves (step0000010" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        check_output(SimpleNamespace(resume=False), cfg, {}, {})
    bad = make(out / "checkpoints", 20)
    (bad / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no complete checkpoint among step0000010, step0000020"):
        check_output(args, cfg, {}, {})


def test_a_latest_file_of_any_bytes_is_reported_not_a_crash(tmp_path):
    """A damaged ``latest`` (not UTF-8) used to end --resume in a UnicodeDecodeError on every rank."""
    ckpt = tmp_path / "checkpoints"
    make(ckpt, 6)
    make(ckpt, 9)
    (ckpt / "latest").write_bytes(b"\x00\xffgarbage../../etc")
    assert checkpoint.latest_tag(ckpt) == "step0000009"
    why = checkpoint.stale_latest(ckpt, "step0000009")
    assert why is not None and "not a checkpoint" in why
