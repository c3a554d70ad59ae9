"""Progress lines, ``metrics.jsonl`` and TensorBoard, written by rank 0 only.

Every ``log_every`` steps one record: step, loss, MLM/NSP accuracy, lr, samples/s, tokens/s (real
tokens, padding not counted), ``mfu`` and ``hfu``, ``data_wait`` (the fraction of the interval this
rank's main process spent blocked on the data loader: above a few percent, add
``pretrain.num_workers``), peak accelerator memory, loss scale and skipped steps (fp16), and
trust-ratio min/median/max. Accuracies are exact over the interval and all ranks (correct and
total counts are summed, not averaged ratios). Evaluations and checkpoints are left out of the
interval's time.

``mfu`` (model FLOPs utilisation) is the model FLOPs of the interval per second over the
accelerator's peak, counted as PaLM's appendix B counts them (``pretrain/flops.py``): per real
(non-padding) token 6 x the encoder layers' parameters + 12·L·h per position it attends over, 6 x
the MLM head's parameters per real masked position, 6 x the pooler's and NSP head's per sample.
``hfu`` counts what was executed instead: every position (padding included), attention over the
whole row, every masked-position slot. The record's ``work`` holds the interval's counts behind
both (summed over all ranks) and ``interval_s`` its time, so either can be recomputed: FLOPs /
interval_s / (world size x peak). The peak is one device's dense peak of the precision in use,
from :data:`PEAK_TFLOPS` by device name or from ``pretrain.peak_tflops``; on a device the table
does not know, both are left out (the run says so at its start).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Optional

from data_prep.atomic import write_text

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets: (bf16/fp16 tensor cores,
# fp32 without TF32), the data sheets' "with sparsity" figures halved. The first pattern that
# matches the device name (as torch.cuda.get_device_name gives it) wins: variants come before
# their family, and whole words are matched, so an L40 is not an L4 nor an A100 an A10.
PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    # NVIDIA H100 data sheet: SXM5 1,979 / 67; PCIe 1,513 / 51; NVL 1,671 / 60 (bf16 sparse / fp32)
    (r"H100\b.*\bPCIe", (756.0, 51.0)), (r"H100\b.*\bNVL", (835.0, 60.0)), (r"H100", (989.0, 67.0)),
    # NVIDIA H800 data sheet: the H100's compute (PCIe and SXM5 alike)
    (r"H800\b.*\bPCIe", (756.0, 51.0)), (r"H800", (989.0, 67.0)),
    # NVIDIA H200 data sheet: SXM 1,979 / 67; NVL 1,671 / 60. GH200 data sheet: 1,979 / 67
    (r"H200\b.*\bNVL", (835.0, 60.0)), (r"H200", (989.0, 67.0)), (r"GH200", (989.0, 67.0)),
    # NVIDIA Blackwell data sheet, per GPU: HGX B200 4.5 PF / 75; GB200 NVL72 5 PF / 80
    (r"GB200", (2500.0, 80.0)), (r"B200", (2250.0, 75.0)),
    # NVIDIA A100 data sheet (SXM4 and PCIe): 624 / 19.5; the A800 is an A100 with slower NVLink
    (r"A100", (312.0, 19.5)), (r"A800", (312.0, 19.5)),
    # NVIDIA A10 data sheet: 250 / 31.2. A10G (AWS): no NVIDIA data sheet; the figures commonly
    # quoted for it, kept from before (unverified)
    (r"A10G", (70.0, 31.2)), (r"A10", (125.0, 31.2)),
    # NVIDIA L40S data sheet 733 / 91.6; L40 data sheet 362.1 / 90.5; L4 data sheet 242 / 30.3
    (r"L40S", (362.0, 91.6)), (r"L40", (181.0, 90.5)), (r"L4", (121.0, 30.3)),
    # NVIDIA V100 data sheet (fp16 tensor, no sparsity then): SXM2 125 / 15.7; PCIe 112 / 14;
    # V100S PCIe 130 / 16.4. T4 data sheet: 65 / 8.1
    (r"V100S", (130.0, 16.4)), (r"V100\b.*\bPCIE", (112.0, 14.0)), (r"V100", (125.0, 15.7)),
    (r"T4", (65.0, 8.1)),
]


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The table's peak for ``precision`` ("bf16", "fp16" or "fp32") on this device, or None
    (a device the table does not know: MFU is then off unless ``pretrain.peak_tflops`` sets it)."""
    for pattern, (half, single) in PEAK_TFLOPS:
        if re.search(rf"\b{pattern}\b", device_name, flags=re.IGNORECASE):
            return single if precision == "fp32" else half
    return None


def mfu_peak(configured: Optional[float], device: str, precision: str) -> tuple[Optional[float], Optional[str]]:
    """One device's peak TFLOP/s behind ``mfu`` and ``hfu``: ``pretrain.peak_tflops`` when set, else
    the table's; with neither, (None, the note the run prints once at its start)."""
    peak = configured or peak_tflops(device, precision)
    if peak is None:
        return None, (f"MFU off: no {precision} peak known for {device!r}; set pretrain.peak_tflops "
                      "(one device's dense TFLOP/s) to log mfu and hfu")
    return float(peak), None


def device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return "cpu"
    import torch

    try:  # torch.cuda / torch.xpu / ... .get_device_name(); not every backend has one
        return str(torch.get_device_module(acc.device_name()).get_device_name())
    except Exception:  # noqa: BLE001
        return acc.device_name()


def peak_memory_gib() -> Optional[float]:
    """Peak accelerator memory allocated by this process since the last call (None on the CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return None
    peak = acc.max_memory_allocated() / 2 ** 30
    acc.reset_peak_memory_stats()
    return peak


def read_records(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (none if absent); an unreadable line (a torn last
    line from a crash, or one being written) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


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
        keep = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            try:
                rec = json.loads(line)
            except ValueError:
                if line.strip():  # a torn last line from a crash while writing: dropped
                    print(f"metrics: dropping unreadable line {n} of {self.path}", flush=True)
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line)
        write_text(self.path, "".join(line + "\n" for line in keep))

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time inside (an evaluation, a checkpoint) is not the interval's: its rates count training only."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._t0 += time.perf_counter() - t

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
            loss = f"loss {record['loss']:.4f}"
            if record.get("mlm_loss") is not None and record.get("nsp_loss") is not None:
                loss += f" (mlm {record['mlm_loss']:.4f} nsp {record['nsp_loss']:.4f})"
            parts = [f"step {record['step']:>6d}", loss,
                     f"mlm_acc {record['mlm_acc']:.3f}", f"nsp_acc {record['nsp_acc']:.3f}",
                     f"lr {record['lr']:.3e}", f"{record['samples_per_s']:.1f} samples/s",
                     f"{record['tokens_per_s']:.0f} tok/s"]
            if record.get("mfu") is not None:
                parts.append(f"MFU {100 * record['mfu']:.1f}% (HFU {100 * record['hfu']:.1f}%)")
            if record.get("data_wait") is not None:
                parts.append(f"data {100 * record['data_wait']:.0f}%")
            if record.get("peak_mem_gib") is not None:
                parts.append(f"mem {record['peak_mem_gib']:.1f} GiB")
            if record.get("gns_b_simple") is not None:
                err = record.get("gns_b_simple_err")
                parts.append(f"B_noise {record['gns_b_simple']:.4g}" + (f"±{err:.2g}" if err is not None else ""))
            if record.get("loss_scale") is not None:
                parts.append(f"scale {record['loss_scale']:g} skipped {record.get('skipped_steps', 0)}")
            if record.get("compiled_graphs"):
                parts.append(f"graphs {record['compiled_graphs']}")
            if "trust_median" in record:
                parts.append(f"trust {record['trust_min']:.3g}/{record['trust_median']:.3g}/{record['trust_max']:.3g}")
            print(" | ".join(parts), flush=True)
        else:
            print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
