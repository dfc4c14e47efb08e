"""Per-step training metrics: JSONL + TensorBoard + a tqdm bar, MFU and peak memory, and the plot.

    log = MetricsLogger(local_dir, total_steps=100, enabled=(rank == 0))
    log.log(step, {"loss": 2.3, "grad_norm": 0.9, "lr": 1e-3, "tokens_per_s": 5e4, ...})
    log.close(); summary = log.summary()
    # MetricsLogger(..., initial_step=4) on a resume keeps rows 1-4 and drops later ones (re-trained)
    plot_loss_curve(local_dir / "metrics.jsonl", local_dir / "loss_curve.png")

MFU = FLOPs/token (`kubellm.model.flops.flops_per_token`) × tokens/s ÷ (peak FLOP/s per device ×
devices). The peak comes from `train.peak_tflops`, else a table of known GPUs (dense bf16/fp16
tensor-core peaks from the vendors' data sheets, matched on the exact model and form factor: an H100
PCIe is not an H100 SXM, an L40 not an L4), else on CPU from $KUBELLM_PEAK_TFLOPS; with no
stated peak MFU is left out rather than guessed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# dense (no sparsity) bf16/fp16 tensor-core TFLOP/s per device, vendors' data sheets (half the "with
# sparsity" figure); fp32 runs use the same number, which is the convention of MFU reports (it is the
# hardware's peak, not the precision's). Keys are model names with their form factor, as
# `gpu_model` normalises what CUDA reports: the H100 SXM5 reports "NVIDIA H100 80GB HBM3" → "H100",
# the PCIe card "NVIDIA H100 PCIe" → "H100 PCIe", "NVIDIA A100-SXM4-80GB" → "A100 SXM4". A name not
# here (another form factor, a MIG slice, a new GPU) has no peak: MFU is left out, not guessed. The
# AWS A10G is not listed: NVIDIA publishes no data sheet for it and its tensor rate is not the A10's.
GPU_PEAK_TFLOPS = {
    "H100": 989.4, "H100 SXM": 989.4, "H100 SXM5": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H200": 989.4, "H200 SXM": 989.4,
    "A100": 312.0, "A100 SXM": 312.0, "A100 SXM4": 312.0, "A100 PCIe": 312.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "V100 SXM2": 125.0, "V100 PCIe": 112.0, "T4": 65.0,
}
_VENDOR_PREFIXES = ("nvidia", "tesla")


def gpu_model(device_name: str) -> str:
    """The model and form factor in a CUDA device name, for `GPU_PEAK_TFLOPS`: vendor words
    ("NVIDIA", "Tesla") and memory size/type words ("80GB", "HBM3", "HBM3e") dropped, words split at
    spaces, '-' and '_' and joined by one space ("Tesla V100-SXM2-16GB" → "V100 SXM2")."""
    words = [w for w in re.split(r"[\s_-]+", device_name) if w]
    while words and words[0].lower() in _VENDOR_PREFIXES:
        words.pop(0)
    return " ".join(w for w in words if not re.fullmatch(r"\d+GB|HBM\d\w*", w, flags=re.IGNORECASE))


def lookup_peak(device_name: str) -> float | None:
    """The data-sheet peak of a GPU by its exact model and form factor (case-insensitive), or None."""
    table = {k.lower(): v for k, v in GPU_PEAK_TFLOPS.items()}
    return table.get(gpu_model(device_name).lower())


def env_peak_tflops() -> float | None:
    """$KUBELLM_PEAK_TFLOPS as a number (None when unset): finite and > 0, else a ConfigError naming
    the variable."""
    from kubellm.core.errors import ConfigError

    raw = os.environ.get("KUBELLM_PEAK_TFLOPS", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"$KUBELLM_PEAK_TFLOPS={raw!r}: expected the peak TFLOP/s per device, a number > 0 "
                          "(e.g. 989 for an H100's dense bf16)")
    return value


def peak_tflops(device: str, configured: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if configured:
        return configured, "train.peak_tflops"
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        value = lookup_peak(name)
        if value is not None:
            return value, f"data sheet peak of {name}"
        return None, f"unknown GPU {name}: set train.peak_tflops"
    if (env := env_peak_tflops()) is not None:
        return env, "$KUBELLM_PEAK_TFLOPS"
    return None, "CPU: no peak stated (set $KUBELLM_PEAK_TFLOPS or train.peak_tflops)"


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: max allocated on CUDA, max RSS on CPU. On Linux the kernel's peak
    mark of this process's own memory (`VmHWM`): `ru_maxrss` also counts the parent a worker was forked
    from (a launcher, a pytest process), which could be larger than the worker itself."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class MetricsLogger:
    """Writes on rank 0 only (`enabled`); other ranks get a no-op logger."""

    def __init__(self, out_dir: str | Path, total_steps: int, *, enabled: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True, initial_step: int = 0) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        self._tb: Any = None
        self._bar: Any = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows = self._keep_rows_up_to(initial_step)
        self._f = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the earlier files' events from this step on (the steps
            # about to be trained again), as metrics.jsonl drops its rows
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=initial_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def _keep_rows_up_to(self, step: int) -> list[dict[str, Any]]:
        """A run resumed at `step` (0: started afresh) keeps its earlier rows and drops the ones after
        `step` — steps about to be trained again — so each step appears once in metrics.jsonl and the
        summary covers the whole run. The file is replaced atomically; a torn last line (a killed
        process) is dropped."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] <= step:
                kept.append(row)
        from kubellm.core.storage import storage_for

        storage_for(str(self.path)).write_bytes(str(self.path),  # atomic: temp file + rename
                                                "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"train/{k}", float(v), step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                  tok_s=f"{values.get('tokens_per_s', 0):.0f}")

    def flush(self) -> None:
        """Everything logged so far on disk (the JSONL is flushed per row; TensorBoard buffers)."""
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def summary(self) -> dict[str, float]:
        """Headline numbers for the stage manifest's `metrics` (and the KFP Metrics artifact)."""
        if not self.rows:
            return {}
        first, last = self.rows[0], self.rows[-1]
        tail = self.rows[len(self.rows) // 2 :] or self.rows  # steady state: skip warm-up steps
        out = {"loss_start": first["loss"], "loss_final": last["loss"], "steps": float(last["step"]),
               "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail),
               "peak_memory_mb": max(r.get("peak_memory_mb", 0.0) for r in self.rows),
               "tokens_seen": last.get("tokens_seen", 0.0)}
        if "mfu" in last:
            out["mfu"] = sum(r["mfu"] for r in tail) / len(tail)
        return out


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "training loss") -> Path:
    """Loss (and learning rate on a second axis) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display in containers or CI
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if rows and "lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def markdown_report(summary: dict[str, float], png_name: str | None, peak_source: str,
                    extra: dict[str, Any] | None = None) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v:.4g} |")
    for k, v in (extra or {}).items():
        lines.append(f"| {k} | {v} |")
    lines.append("")
    lines.append(f"MFU peak: {peak_source}.")
    if png_name:
        lines += ["", f"![loss curve]({png_name})"]
    return "\n".join(lines)
