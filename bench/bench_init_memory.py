"""Host memory a tensor-parallel rank needs to build its shard of a freshly initialised model.

    python -m bench.bench_init_memory            # `1b` preset, TP = 2, rank 0; 5 processes per side
    python -m bench.bench_init_memory --quick    # `debug` preset, smoke run

Each sample is a fresh process (`--child ours|reference`) that reports its peak resident memory above
what it held before building (the kernel's peak mark, `VmHWM`, reset then: `ru_maxrss` also counted the
parent process a child is forked from, which inflated small samples taken from a large parent), so no
allocator cache carries over between samples. Ours is what the engine does (`kubellm.training.topology`): the TP model built on
the meta device and materialised once, each dense tensor drawn from the RNG, sliced into the rank's
shard and dropped before the next one (`fill_from_dense`). The reference is what it did until
2026-11-24: the whole dense model first, then the rank's shards cut from its state dict. Row 1
compares ours with that; row 2 compares ours with what holding one dense tensor at a time predicts
(the pages of a parameter not yet filled are not resident, so the shards count as they are filled).

Row 3 is the same rank starting from given weights, as an SFT or DPO worker does from its base model
(an fp32 safetensors export of the same model, written once before the samples): ours opens it with
`kubellm.model.hf.open_hf` and fills the shard tensor by tensor as it reads them; the reference is
what the workers did until 2026-11-25, `load_hf` (the whole model on the host) and then the same fill.
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


def child(which: str, preset: str, weights_dir: str | None = None) -> dict[str, float]:
    import torch

    from kubellm.model import Transformer, get_preset
    from kubellm.model.hf import load_hf, open_hf
    from kubellm.model.parallel import TensorParallelGroup, TensorParallelLayers, shard_state_dict
    from kubellm.model.transformer import init_order
    from kubellm.training.topology import fill_from_dense

    torch.set_num_threads(2)
    cfg = get_preset(preset)
    layers = TensorParallelLayers(TensorParallelGroup(rank=0, size=2))
    with torch.device("meta"):
        dense = {k: v.numel() * 4 for k, v in Transformer(cfg).named_parameters()}
        local = {k: v.numel() * 4 for k, v in Transformer(cfg, layers=layers).named_parameters()}
    # while dense tensor i is sliced: the shards filled before it, it, its slice and the parameter
    # the slice is copied into (the untouched parameters' pages are not resident yet)
    filled, planned = 0, 0
    for name, _ in init_order(cfg):
        planned = max(planned, filled + dense[name] + 2 * local[name])
        filled += local[name]
    planned = max(planned, filled)
    torch.manual_seed(0)
    before = reset_peak_rss()
    if which == "ours":
        model = Transformer(cfg, layers=layers, init=False)
        fill_from_dense(model, cfg, 0, 2, None)
    elif which == "ours-given":
        weights, _ = open_hf(str(weights_dir))
        model = Transformer(cfg, layers=layers, init=False)
        fill_from_dense(model, cfg, 0, 2, weights)
    elif which == "reference-given":
        whole, _ = load_hf(str(weights_dir))
        model = Transformer(cfg, layers=layers, init=False)
        fill_from_dense(model, cfg, 0, 2, whole.state_dict())
        del whole
    else:
        full = Transformer(cfg).state_dict()
        model = Transformer(cfg, layers=layers, init=False)
        model.load_state_dict(shard_state_dict(full, cfg, 0, 2))
        del full
    peak = peak_rss() - before
    return {"peak": float(peak), "shard": float(filled), "planned": float(planned), "dense": float(sum(dense.values()))}


def sample(which: str, preset: str, weights_dir: str | None = None) -> dict[str, float]:
    extra = ["--weights", weights_dir] if weights_dir else []
    out = subprocess.run([sys.executable, "-m", "bench.bench_init_memory", "--child", which, "--preset", preset,
                          *extra], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--child", choices=["ours", "reference", "ours-given", "reference-given"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, help="model preset (default 1b; debug with --quick)")
    args = p.parse_args(argv)
    preset = args.preset or ("debug" if args.quick else "1b")
    if args.child:
        print(json.dumps(child(args.child, preset, args.weights)))
        return 0
    load = load_avg()
    n = repeats(args)
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "reference": [], "ours-given": [], "reference-given": []}
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-init-") as tmp:
        _export(preset, Path(tmp) / "hf")
        for _ in range(n):  # alternating, each in a fresh process
            for which in runs:
                runs[which].append(sample(which, preset, str(Path(tmp) / "hf") if "given" in which else None))
    ours, ref = (median([r["peak"] for r in runs[k]]) for k in ("ours", "reference"))
    info = runs["ours"][0]
    ours_g, ref_g = (median([r["peak"] for r in runs[k]]) for k in ("ours-given", "reference-given"))
    rows = [
        memory_reduction_row(
            f"TP rank's host memory to initialise its shard, {preset}, tp = 2", ours, ref,
            f"reference: the dense model ({info['dense'] / GIB:.2f} GiB fp32) built whole, then sharded (kubellm "
            "before 2026-11-24)", load, n),
        memory_formula_row(
            f"TP rank's init memory vs one dense tensor at a time, {preset}, tp = 2", ours, info["planned"],
            "formula: the largest, over the draw order, of the shards filled so far + the dense tensor being sliced "
            f"+ its slice twice (copy and parameter); the rank's shards alone are {info['shard'] / GIB:.2f} GiB",
            load, n),
        memory_reduction_row(
            f"TP rank's host memory to fill its shard from a base model's safetensors (SFT/DPO), {preset}, tp = 2",
            ours_g, ref_g, "ours: `open_hf`, each tensor read as the shard is filled; reference: `load_hf` (the "
            "whole model on the host, kubellm's SFT/DPO workers before 2026-11-25), then the same fill", load, n),
    ]
    return emit(rows, args)


def _export(preset: str, out: Path) -> None:
    """The base model the given-weights samples read: this preset at seed 0, an fp32 safetensors export,
    written in a fresh process so its memory is gone before the samples start."""
    code = ("import sys, torch; from kubellm.model import Transformer, get_preset; from kubellm.model.hf import "
            "export_hf; cfg = get_preset(sys.argv[1]); torch.manual_seed(0); export_hf(Transformer(cfg), cfg, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, preset, str(out)], cwd=REPO, check=True)


if __name__ == "__main__":
    raise SystemExit(main())
