"""Host memory a tensor-parallel rank needs to build its shard of a freshly initialised model.

    python -m bench.bench_init_memory            # `1b` preset, TP = 2, rank 0; 5 processes per side
    python -m bench.bench_init_memory --quick    # `debug` preset, smoke run

Each sample is a fresh process (`--child ours|reference`) that reports its peak resident memory above
what it held before building (`ru_maxrss` against /proc/self/statm), so no allocator cache carries
over between samples. Ours is what the engine does (`kubellm.training.topology`): the TP model built on
the meta device and materialised once, each dense tensor drawn from the RNG, sliced into the rank's
shard and dropped before the next one (`fill_from_dense`). The reference is what it did until
2026-11-24: the whole dense model first, then the rank's shards cut from its state dict. Row 1
compares ours with that; row 2 compares ours with what holding one dense tensor at a time predicts
(the pages of a parameter not yet filled are not resident, so the shards count as they are filled).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from bench.common import Row, emit, load_avg, median, parser, repeats, within

REPO = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def child(which: str, preset: str) -> dict[str, float]:
    import torch

    from kubellm.model import Transformer, get_preset
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
    before = _rss_bytes()
    if which == "ours":
        model = Transformer(cfg, layers=layers, init=False)
        fill_from_dense(model, cfg, 0, 2, None)
    else:
        full = Transformer(cfg).state_dict()
        model = Transformer(cfg, layers=layers, init=False)
        model.load_state_dict(shard_state_dict(full, cfg, 0, 2))
        del full
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak": float(peak), "shard": float(filled), "planned": float(planned), "dense": float(sum(dense.values()))}


def sample(which: str, preset: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "bench.bench_init_memory", "--child", which, "--preset", preset],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, help="model preset (default 1b; debug with --quick)")
    args = p.parse_args(argv)
    preset = args.preset or ("debug" if args.quick else "1b")
    if args.child:
        print(json.dumps(child(args.child, preset)))
        return 0
    load = load_avg()
    n = repeats(args)
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "reference": []}
    for _ in range(n):  # alternating, each in a fresh process
        for which in runs:
            runs[which].append(sample(which, preset))
    ours, ref = (median([r["peak"] for r in runs[k]]) for k in ("ours", "reference"))
    info = runs["ours"][0]
    gib = 2**30
    ratio = ref / ours
    row1 = Row(f"TP rank's host memory to initialise its shard, {preset}, tp = 2", ours / gib, ref / gib, "GiB peak",
               ratio, "> 1× (no issue target)", ratio > 1.0,
               f"reference: the dense model ({info['dense'] / gib:.2f} GiB fp32) built whole, then sharded "
               "(kubellm before 2026-11-24); ratio = reference / ours", load, n)
    formula = info["planned"]
    ok, why = within(ours / formula, 0.10)
    row2 = Row(f"TP rank's init memory vs one dense tensor at a time, {preset}, tp = 2", ours / gib,
               formula / gib, "GiB peak", ours / formula, "within ±10%", ok,
               f"formula: the largest, over the draw order, of the shards filled so far + the dense tensor being "
               f"sliced + its slice twice (copy and parameter); the rank's shards alone are {info['shard'] / gib:.2f} "
               f"GiB; {why}".rstrip("; "), load, n)
    return emit([row1, row2], args)


if __name__ == "__main__":
    raise SystemExit(main())
