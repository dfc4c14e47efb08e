"""Host memory rank 0 adds while it writes the HF export of the trained model.

    python -m bench.bench_export_memory            # `1b` preset (4.4 GB fp32), 1 GiB shards; 5 processes per side
    python -m bench.bench_export_memory --quick    # `debug` preset, smoke run

Rank 0 holds the consolidated fp32 state dict when it exports (`kubellm.model.hf.export_hf`); what is
measured is the peak resident memory above that. Each sample is a fresh process (`--child
sharded|single`) that builds the model, resets the kernel's peak-RSS mark (`/proc/self/clear_refs`)
and exports it, then reads the peak (`VmHWM`). Ours writes shards of at most `--shard-gib` with an
index, one shard's copies in memory at a time; the reference is one `model.safetensors`, which copies
every tensor at once: what `export_hf` did for every model until 2026-11-25, and still does for a model
under `MAX_SHARD_BYTES` (5 GB). Row 2 compares ours with the size of its largest shard.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import (
    GIB,
    emit,
    load_avg,
    median,
    memory_formula_row,
    memory_reduction_row,
    parser,
    peak_rss,
    repeats,
    reset_peak_rss,
)

REPO = Path(__file__).resolve().parents[1]


def child(which: str, preset: str, shard_bytes: int, out: str) -> dict[str, float]:
    import torch

    from kubellm.model import Transformer, get_preset
    from kubellm.model.hf import export_hf

    torch.set_num_threads(2)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    sd = Transformer(cfg).state_dict()
    before = reset_peak_rss()
    export_hf(sd, cfg, out, max_shard_bytes=shard_bytes if which == "sharded" else 2**62)
    peak = peak_rss() - before
    files = sorted(Path(out).glob("model*.safetensors"))
    return {"peak": float(peak), "model": float(sum(v.numel() * 4 for v in sd.values())),
            "largest_shard": float(max(f.stat().st_size for f in files)), "files": float(len(files))}


def sample(which: str, preset: str, shard_bytes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-export-") as tmp:
        out = subprocess.run([sys.executable, "-m", "bench.bench_export_memory", "--child", which, "--preset", preset,
                              "--shard-bytes", str(shard_bytes), "--out", str(Path(tmp) / "hf")],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--child", choices=["sharded", "single"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, help="model preset (default 1b; debug with --quick)")
    p.add_argument("--shard-gib", type=float, default=None, help="ours: the shard size (default 1 GiB; "
                   "with --quick 1/8 of the model)")
    args = p.parse_args(argv)
    preset = args.preset or ("debug" if args.quick else "1b")
    if args.child:
        print(json.dumps(child(args.child, preset, args.shard_bytes, args.out)))
        return 0
    if args.shard_gib is not None:
        shard_bytes = int(args.shard_gib * 2**30)
    elif args.quick:
        from kubellm.model import get_preset
        from kubellm.model.flops import num_params

        shard_bytes = num_params(get_preset(preset)) * 4 // 8
    else:
        shard_bytes = 2**30
    load = load_avg()
    n = repeats(args)
    runs: dict[str, list[dict[str, float]]] = {"sharded": [], "single": []}
    for _ in range(n):  # alternating, each in a fresh process
        for which in runs:
            runs[which].append(sample(which, preset, shard_bytes))
    ours, ref = (median([r["peak"] for r in runs[k]]) for k in ("sharded", "single"))
    info = runs["sharded"][0]
    rows = [memory_reduction_row(
                f"rank 0's extra host memory to write the HF export, {preset}", ours, ref,
                f"ours: {int(info['files'])} shards of ≤ {shard_bytes / GIB:.2f} GiB with an index; reference: one "
                f"file, every tensor copied at once (the model is {info['model'] / GIB:.2f} GiB fp32)", load, n),
            memory_formula_row(
                f"export's extra memory vs its largest shard, {preset}", ours, info["largest_shard"],
                "formula: the bytes of the largest shard file (one shard's copies held at a time)", load, n)]
    return emit(rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
