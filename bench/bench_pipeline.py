"""Pipeline bubble, pp = 2 (2 processes, gloo, CPU), micro-batches m = 4/8/16, from per-stage
timestamps, against the 1F1B/GPipe bubble (p−1)/(m+p−1).

    python -m bench.bench_pipeline
    python -m bench.bench_pipeline --quick

The model is `kubellm.training.pipeline.build_pipeline` (DeepSpeed `PipelineModule`, stages balanced
by parameter count — the run-config default; a `uniform` layer-count split of the 11 layers puts
the embedding + 5 blocks on stage 0 and 3 blocks + norm + head on stage 1, and that imbalance, not
the schedule, then dominates the idle time) driven by `PipelineEngine.train_batch`. Each rank records the
start and end of every ForwardPass and BackwardPass instruction (DeepSpeed's instruction map is
wrapped; wall clock shared by both processes). Per optimizer step: span = first compute start to
last compute end over both stages; a stage's bubble = 1 − its compute time / span; the row reports
the mean over stages and steps (median of the steps after a warm-up step). Send/recv waits count as
bubble, as they do on a cluster. The shape (dim 256, 8 layers, vocab 512) keeps the blocks — not the
embedding or the head — the bulk of the work, so the two stages are balanced, which the formula assumes.
Target (issue 12): within ±15% of the formula.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Row, emit, load_avg, median, parser, within


def measure_rank(m: int, steps: int, micro: int, seq: int) -> list[dict[str, Any]]:
    """Runs on each rank (kubellm.training.spawn): returns per-step compute intervals."""
    import deepspeed
    import torch
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from kubellm.model.config import ModelConfig
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.engine import init_distributed
    from kubellm.training.pipeline import build_pipeline

    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=8, n_heads=8, ffn_dim=704, max_seq_len=seq)
    tc = TrainConfig(micro_batch_size=micro, global_batch_size=micro * m, seq_len=seq)
    rank, _ = init_distributed("cpu")
    torch.manual_seed(0)
    built = build_pipeline(cfg, tc, ParallelConfig(dp=1, tp=1, pp=2))  # pipeline_partition: parameters
    intervals: list[tuple[float, float]] = []
    orig = dict(PipelineEngine._INSTRUCTION_MAP)

    def timed(fn: Any) -> Any:
        def wrapper(self: Any, *a: Any, **k: Any) -> Any:
            t0 = time.time()
            out = fn(self, *a, **k)
            intervals.append((t0, time.time()))
            return out
        return wrapper

    PipelineEngine._INSTRUCTION_MAP = {**orig, schedule.ForwardPass: timed(orig[schedule.ForwardPass]),
                                       schedule.BackwardPass: timed(orig[schedule.BackwardPass])}
    ds = {"train_batch_size": micro * m, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": m,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=built.module, model_parameters=[p for p in built.module.parameters()
                                                                             if p.requires_grad], config=ds)
    gen = torch.Generator().manual_seed(0)

    def batches() -> Any:
        while True:
            ids = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=gen)
            yield ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    it = batches()
    out = []
    for _ in range(steps):
        intervals.clear()
        engine.train_batch(it)
        out.append({"rank": rank, "intervals": list(intervals)})
    PipelineEngine._INSTRUCTION_MAP = orig
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    from kubellm.training.spawn import spawn

    rows = []
    micro, seq = (2, 32) if args.quick else (4, 128)
    steps = 2 if args.quick else 1 + max(5, args.repeats or 5)
    for m in ((4,) if args.quick else (4, 8, 16)):
        load = load_avg()
        ideal = 1 / (m + 1)  # (p−1)/(m+p−1) with p = 2
        try:
            per_rank = spawn(measure_rank, 2, m, steps, micro, seq)
        except Exception as e:  # noqa: BLE001 — record why, keep the other rows
            rows.append(Row(f"pipeline bubble, pp=2, m={m}", None, ideal, "fraction", None, "within ±15%", None,
                            f"failed: {str(e).strip().splitlines()[-1][:200]}", load, 0))
            continue
        bubbles = []
        for step in range(1 if steps > 1 else 0, steps):
            ivs = [per_rank[r][step]["intervals"] for r in range(2)]
            start = min(a for iv in ivs for a, _ in iv)
            end = max(b for iv in ivs for _, b in iv)
            span = end - start
            bubbles.append(sum(1 - sum(b - a for a, b in iv) / span for iv in ivs) / 2)
        b = median(bubbles)
        ok, note = within(b / ideal, 0.15)
        rows.append(Row(f"pipeline bubble, pp=2, m={m} (1F1B, micro {micro} × seq {seq})", b, ideal, "fraction",
                        b / ideal, "within ±15%", ok, f"median of {len(bubbles)} steps. {note}".strip(), load,
                        len(bubbles)))
    return emit(rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
