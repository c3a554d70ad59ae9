"""Stage o, ZeRO-Offload: LAMB stepping CPU partitions under ZeRO-2 with the device's group, in a
process of its own (offload_worker.py: it starts a process group)."""
from __future__ import annotations

import os
import subprocess
import sys

from bench.gpucheck.common import REPO


def stage_o(args, report, state: dict) -> None:
    prec = "bf16" if args.device != "cpu" else "fp32"
    env = dict(os.environ, MASTER_PORT=str(args.port + 7), PYTHONUNBUFFERED="1")
    # -m from the repository root: the worker imports optim and pretrain as run.py does
    proc = subprocess.run([sys.executable, "-m", "bench.gpucheck.offload_worker", prec], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    out = proc.stdout + proc.stderr
    line = next((x for x in out.splitlines() if x.startswith("OFFLOAD_OK")), None)
    ok = proc.returncode == 0 and line is not None
    report("o.offload", ok, {"precision": prec, "result": line, **({} if ok else {"log_tail": out[-2500:]})},
           line or f"failed (rc {proc.returncode}): {out.strip().splitlines()[-1] if out.strip() else ''}")
