"""GPU MFU of kubellm's training step (bf16, one GPU) for a 350M–1B preset, divided by the GPU's dense
bf16 data-sheet peak — the one the engine's own MFU uses (`kubellm.training.metrics.lookup_peak`: 989
TFLOP/s for an H100 SXM or H200, 756 for an H100 PCIe, …; `--peak-tflops` for a GPU not in it). Runs only
where CUDA exists (the `device` tool's machines, never CI).

    python -m bench.bench_mfu_gpu --preset 1b --batch 8 --seq-len 2048
    python -m bench.bench_mfu_gpu --quick     # 350m, 3 timed steps

The step is the one `train()` runs (`bench.bench_pretrain._ours` on "cuda"): kubellm's Transformer
through the DeepSpeed engine in its bf16 mode, AdamW param groups and schedule, the LM head's fused
chunked cross-entropy (`model(ids, labels=...)`), gradient clipping. MFU = model FLOPs per token
(`kubellm.model.flops.flops_per_token`, 6N + attention) × tokens/s / peak.
Target (issue 12): ≥ 40%, stretch ≥ 50%.
"""

from __future__ import annotations

import math
import os
import time

import torch

if torch.cuda.is_available():  # before DeepSpeed loads: bench.common (and run_all's env) default it to cpu,
    os.environ["DS_ACCELERATOR"] = "cuda"  # which would make the engine move the model back to the CPU

from bench.common import Row, emit, load_avg, median, parser  # noqa: E402

TARGET = 0.40


def measure(preset: str, batch: int, seq_len: int, compile_: bool, device: str, warmup: int, steps: int
            ) -> tuple[float, int, list[float], list[float]]:
    """(tokens/s median, seq, per-step seconds, losses) of kubellm's training step on `device`."""
    from bench.bench_pretrain import _ours
    from kubellm.model.config import get_preset

    cfg = get_preset(preset)
    seq = min(seq_len, cfg.max_seq_len)
    step = _ours(preset, batch, seq, "bf16", compile_, device=device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, losses = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step(ids))  # float(loss): the step has finished on the device too
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch * seq / median(times), seq, times, losses


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--preset", default="1b", choices=["350m", "1b"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, where "
                   "kubellm's table does not know it")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU MFU not measured (run this on a machine with a GPU)")
        return emit([Row("GPU MFU, bf16, one GPU", None, TARGET, "MFU", None, "≥ 40%", None,
                         "not measured (no GPU lent to this task)", load_avg(), 0)], args)
    from kubellm.model.config import get_preset
    from kubellm.model.flops import flops_per_token
    from kubellm.training.metrics import lookup_peak

    name = torch.cuda.get_device_name()
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        p.error(f"--peak-tflops={args.peak_tflops}: expected the GPU's dense bf16 peak TFLOP/s, a number > 0")
    peak = args.peak_tflops if args.peak_tflops is not None else lookup_peak(name)
    if peak is None:
        p.error(f"no data-sheet bf16 peak known for {name!r}: give it with --peak-tflops")

    preset = "350m" if args.quick else args.preset
    tps, seq, times, _ = measure(preset, args.batch, args.seq_len, args.compile, "cuda", 3, 3 if args.quick else 10)
    mfu = flops_per_token(get_preset(preset), seq) * tps / (peak * 1e12)
    return emit([Row(f"GPU MFU, {preset}, bf16, batch {args.batch} × seq {seq}, {name}",
                     mfu, TARGET, "MFU", mfu / TARGET, "≥ 40%", mfu >= TARGET,
                     f"{tps:,.0f} tokens/s, peak {peak} TFLOP/s, peak memory "
                     f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", load_avg(), len(times))], args)


if __name__ == "__main__":
    raise SystemExit(main())
