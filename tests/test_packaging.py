"""An installed package works: the wheel carries the C kernels' source, the shipped configs and the
scaling study, whose plotting library is an optional extra."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_kernel_source_and_configs(tmp_path):
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "__pycache__",
                                                             "runs", "demo_out", ".gpu", ".whl", "docs"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("bigbatch_bert-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "optim/csrc/layerwise_cpu.c" in names
    assert "optim/_triton.py" in names
    shipped = {p.name for p in (REPO / "ds_configs").glob("*.json")}
    assert shipped and {f"ds_configs/{n}" for n in shipped} <= names
    # finetune finds its default config relative to its package, so it must sit beside it
    assert "finetune/squad.py" in names and "ds_configs/squad.json" in names
    # the scaling study ships as its own package; its plotting library is an extra, not a dependency
    assert {"scaling/__main__.py", "scaling/grid.py", "scaling/confirm.py", "scaling/predict.py"} <= names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    plotting = [r for r in requires if r.startswith("matplotlib")]
    assert plotting and all('extra == "study"' in r for r in plotting), plotting
    assert any(r.startswith("torch") and "extra" not in r for r in requires)
