"""Progress lines, ``metrics.jsonl`` and TensorBoard, written by rank 0 only.

Every ``log_every`` steps one record: step, loss, MLM/NSP accuracy, lr, samples/s, tokens/s,
loss scale and trust-ratio min/median/max. Accuracies are exact over the interval and all ranks
(correct and total counts are summed, not averaged ratios).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, output: Path, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.writer = None
        if enabled:
            output.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)
                except ImportError:
                    print("metrics: tensorboard is not installed; TensorBoard logs are off", flush=True)
        self._t0 = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run logs those steps again (a fresh run: all)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def log(self, record: dict, trust: Optional[dict[str, float]] = None, histogram: bool = False) -> None:
        if not self.enabled:
            return
        if trust:
            vals = [v for v in trust.values() if math.isfinite(v)]
            record.update(trust_min=min(vals), trust_median=statistics.median(vals), trust_max=max(vals))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{'eval' if k.startswith('eval_') else 'train'}/{k}", v, step)
            if histogram and trust:
                import numpy as np

                self.writer.add_histogram("trust_ratio/all", np.array(list(trust.values())), step)
                for name, v in trust.items():
                    self.writer.add_scalar(f"trust_ratio/{name}", v, step)
            self.writer.flush()
        if "loss" in record:
            parts = [f"step {record['step']:>6d}", f"loss {record['loss']:.4f}",
                     f"mlm_acc {record['mlm_acc']:.3f}", f"nsp_acc {record['nsp_acc']:.3f}",
                     f"lr {record['lr']:.3e}", f"{record['samples_per_s']:.1f} samples/s",
                     f"{record['tokens_per_s']:.0f} tok/s"]
            if record.get("loss_scale") is not None:
                parts.append(f"scale {record['loss_scale']:g}")
            if "trust_median" in record:
                parts.append(f"trust {record['trust_min']:.3g}/{record['trust_median']:.3g}/{record['trust_max']:.3g}")
            print(" | ".join(parts), flush=True)
        else:
            print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
