"""Pretrain step tokens/s rows for BENCHMARKS.md: our engine vs `transformers.LlamaForCausalLM` +
`torch.optim.AdamW`, measured by the engine engineer's `bench.bench_pretrain.bench` (alternating
rounds, median), for the `debug` and `seed` presets in fp32, plus the bf16-autocast and
`torch.compile` variants (both sides get the same precision / compile setting).

    python -m bench.bench_train_step                 # fp32 + bf16 for debug and seed, compile for debug
    python -m bench.bench_train_step --no-compile
    python -m bench.bench_train_step --quick         # debug only, fp32, 1 step per round

Target (issue 12): ours ≥ 1.25× the reference.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import Row, at_least, emit, load_avg, parser


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (minutes on 2 cores)")
    args = p.parse_args(argv)
    from bench.bench_pretrain import bench

    torch.set_num_threads(args.threads)
    plan: list[tuple[str, str, bool]] = [("debug", "fp32", False)]
    if not args.quick:
        plan += [("seed", "fp32", False), ("debug", "bf16", False), ("seed", "bf16", False)]
        if not args.no_compile:
            plan += [("debug", "fp32", True)]
    rows = []
    for preset, precision, compiled in plan:
        ns = argparse.Namespace(batch=8, seq_len=0, precision=precision, warmup=1 if args.quick else 3,
                                steps=1 if args.quick else 5, rounds=1 if args.quick else max(5, args.repeats or 5),
                                min_sample_s=0.0 if args.quick else 1.0)
        load = load_avg()
        try:
            r = bench(preset, ns, compiled)
        except Exception as e:  # noqa: BLE001 — e.g. torch.compile without a C++ toolchain: record it
            rows.append(Row(f"pretrain step tokens/s, {preset}, {precision}{', compiled' if compiled else ''}",
                            None, None, "tokens/s", None, "≥ 1.25×", None,
                            f"failed: {type(e).__name__}: {str(e)[:160]}", load, 0))
            continue
        met, note = at_least(r["ratio"], 1.25)
        what = f"pretrain step tokens/s, {preset}, {precision}{', torch.compile both' if compiled else ''}"
        rows.append(Row(what, r["ours"], r["hf"], "tokens/s", r["ratio"], "≥ 1.25×", met,
                        f"batch 8 × seq {int(r['seq'])}, {args.threads} threads, 1 process (DeepSpeed ZeRO 0), "
                        f"{int(r['steps'])} steps per timed sample. "
                        f"{note}".strip(), load, ns.rounds))
    return emit(rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
