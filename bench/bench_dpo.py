"""DPO tokens/s against SFT tokens/s on the same model and the same number of tokens, all through
`kubellm.training.engine.train` (1 process): `SFTObjective` on sequences of length T (one sequence a
row, no doc_ids: the same plain causal attention as DPO's pairs, not the document mask of packs),
`DPOObjective` with a live frozen reference and with cached reference log-probs on pairs (2 × T
tokens each, half the micro-batch so both see the same tokens per step).

    python -m bench.bench_dpo            # seed preset, seq 128, 12 steps per run, 1 + 5 alternating rounds
    python -m bench.bench_dpo --quick

Targets (issue 12): DPO ≥ 0.7× SFT with the live reference, ≥ 0.9× with the cached one. The DPO
live reference does an extra no-grad forward, so its ideal is ~0.8× of SFT (a forward is ~1/4 of a
step here: ~31 of ~120 ms on `seed`).
Warm-up: one untimed round of all three first (the first runs in a process were up to 30% slower
for ~12 steps while the allocator settled), then the first 4 steps of every timed run are dropped.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import Row, at_least, emit, load_avg, median, parser, repeats


def sft_arrays(n: int, seq: int, vocab: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(n):
        ids = rng.integers(7, vocab, seq)
        labels = np.where(np.arange(seq) < seq // 2, -100, np.roll(ids, -1))  # assistant half trains
        # one sequence a row, as DPO's pairs: no doc_ids, so both take the same (plain causal) attention
        out.append({"input_ids": ids, "labels": labels})
    return out


def dpo_arrays(n: int, seq: int, vocab: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(n):
        ids = rng.integers(7, vocab, (2, seq))
        labels = np.where(np.arange(seq)[None] < seq // 2, -100, np.roll(ids, -1, axis=1))
        out.append({"input_ids": ids, "labels": labels})
    return out


def steady_tokens_per_s(metrics_path: Path, skip: int = 4) -> float:
    from kubellm.training.metrics import read_metrics

    rows = read_metrics(metrics_path)[skip:]
    return median([r["tokens_per_s"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    from kubellm.dpo.objective import DPOObjective, precompute_reference
    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.sft.objective import SFTObjective
    from kubellm.training.config import OptimConfig, ParallelConfig, TrainConfig
    from kubellm.training.engine import train

    torch.set_num_threads(2)
    preset = "debug" if args.quick else "seed"
    cfg = get_preset(preset)
    seq, micro = min(128, cfg.max_seq_len), 8
    steps = 6 if args.quick else 12
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ref_model = Transformer(cfg)
    init = copy.deepcopy(ref_model.state_dict())
    sft = SFTObjective([])
    sft.examples = sft_arrays(64, seq, cfg.vocab_size, rng)
    pairs = dpo_arrays(32, seq, cfg.vocab_size, rng)
    cached = [dict(a) for a in pairs]
    precompute_reference(ref_model, cached)
    objectives = {
        "sft": (sft, micro),
        "dpo_live": (DPOObjective(pairs, beta=0.1, reference=ref_model), micro // 2),
        "dpo_cached": (DPOObjective(cached, beta=0.1), micro // 2),
    }
    load = load_avg()
    rates: dict[str, list[float]] = {k: [] for k in objectives}
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-dpo-") as tmp:
        for rnd in range(1 + repeats(args)):  # round 0: warm-up, not recorded
            for name, (obj, mb) in objectives.items():  # alternate sft, live, cached, sft, ...
                tc = TrainConfig(max_steps=steps, micro_batch_size=mb, global_batch_size=mb, seq_len=seq,
                                 progress_bar=False, tensorboard=False, checkpoint_every=0,
                                 optim=OptimConfig(lr=1e-4, warmup_steps=0))
                res = train(cfg, tc, ParallelConfig(), obj, str(Path(tmp) / f"{name}-{rnd}"),
                            init_state_dict=init, resume=False)
                assert res.metrics_path is not None
                if rnd:
                    rates[name].append(steady_tokens_per_s(res.metrics_path))
    sft_rate = median(rates["sft"])
    rows = []
    for name, target in (("dpo_live", 0.7), ("dpo_cached", 0.9)):
        r = median(rates[name]) / sft_rate
        met, note = at_least(r, target)
        rows.append(Row(f"DPO ({'live' if name == 'dpo_live' else 'cached'} reference) tokens/s vs SFT, {preset}",
                        median(rates[name]), sft_rate, "tokens/s", r, f"≥ {target}×", met,
                        f"{micro} × {seq} tokens per step both, median of per-step tokens/s after 4 warm-up "
                        f"steps over {len(rates[name])} alternating runs after a warm-up round. {note}".strip(), load, len(rates[name])))
    return emit(rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
