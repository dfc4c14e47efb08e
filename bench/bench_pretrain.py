"""Benchmark (not a test): tokens/s of kubellm's training step vs transformers' LlamaForCausalLM.

    TORCH_EXTENSIONS_DIR=.cache/torch_extensions DS_ACCELERATOR=cpu \
        .venv/bin/python -m bench.bench_pretrain --presets debug seed --threads 2 [--compile]

Both sides train the same shape (the preset's ModelConfig; LlamaForCausalLM built from
`kubellm.model.hf.hf_config_dict`), on the same fixed batch, with the same threads and precision:
  ours  kubellm Transformer + AdamW param groups + LR schedule through the DeepSpeed engine
        (1 process, ZeRO 0, gradient clipping), loss through `model(ids, labels=...)` as the
        pretrain objective does (the LM head's fused, chunked cross-entropy) — the engine's step
  hf    LlamaForCausalLM (sdpa attention) + torch.optim.AdamW(fused=True) + clip_grad_norm_(foreach=True),
        plain PyTorch with the fast paths a user turns on; with --compile, forward + loss compiled together
`build_engine` keeps freed host memory for reuse (`train.host_memory_reuse`: glibc mallopt). That
setting is process-wide, so the reference, built after it in the same process, runs under it too;
`--no-host-memory-reuse` runs both sides with glibc's defaults instead.
Rounds alternate ours/hf so machine noise hits both; each round times `--steps` steps after
`--warmup` untimed ones; the median over `--rounds` (≥ 5) is reported with the ratio ours/hf.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import MIN_REPEATS  # noqa: E402


def _ours(preset: str, batch: int, seq: int, precision: str, compile_: bool,
          host_memory_reuse: bool = True, device: str = "cpu") -> Callable[[torch.Tensor], float]:
    """kubellm's training step as `train()` builds it on `device` (bench.bench_mfu_gpu uses "cuda")."""
    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.dsconfig import clips_in_kubellm, deepspeed_config
    from kubellm.training.engine import build_engine
    from kubellm.training.gradients import clip_gradients
    from kubellm.training.process_group import init_distributed

    cfg = get_preset(preset)
    tc = TrainConfig(micro_batch_size=batch, global_batch_size=batch, seq_len=seq, precision=precision,
                     max_steps=10**6, host_memory_reuse=host_memory_reuse, device=device)
    init_distributed(device)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if compile_:
        model.compile()  # as train() does with train.compile: true
    if device == "cuda":
        model = model.cuda()
    engine, _ = build_engine(model, tc, deepspeed_config(tc, ParallelConfig(), 1, device))  # as train() does
    amp = precision == "bf16" and device == "cpu"  # CUDA: DeepSpeed's bf16 mode (dsconfig), as train() does
    own_clip = clips_in_kubellm(tc, ParallelConfig(), device)

    def step(ids: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = engine(ids[:, :-1], labels=ids[:, 1:])  # the pretrain objective's call: fused LM-head loss
        engine.backward(loss)
        if own_clip:  # as train() does: torch's foreach clip, DeepSpeed's gradient_clipping is 0
            clip_gradients(engine, tc.optim.grad_clip)
        engine.step()
        return float(loss.detach())

    return step


def _hf(preset: str, batch: int, seq: int, precision: str, compile_: bool) -> Callable[[torch.Tensor], float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubellm.model.config import get_preset
    from kubellm.model.hf import hf_config_dict
    from kubellm.training.config import OptimConfig

    cfg = get_preset(preset)
    o = OptimConfig()
    torch.manual_seed(0)
    hcfg = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    hcfg["use_cache"] = False  # a training step: no KV cache built in forward (ours builds none either)
    model = LlamaForCausalLM(LlamaConfig(**hcfg, attn_implementation="sdpa"))
    model.train()
    # The same fast paths a plain-PyTorch user turns on, as ours uses: fused AdamW (one kernel over
    # all parameters, not a per-tensor loop), foreach clipping, and with compile the loss compiled
    # together with the forward (ours compiles the model's fused LM-head loss with it).
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            fused=True)
    amp = precision == "bf16"

    def forward_loss(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    loss_fn = torch.compile(forward_loss) if compile_ else forward_loss

    def step(ids: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench(preset: str, args: argparse.Namespace, compile_: bool) -> dict[str, float]:
    from kubellm.model.config import get_preset

    cfg = get_preset(preset)
    seq = min(args.seq_len or cfg.max_seq_len, cfg.max_seq_len)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), generator=torch.Generator().manual_seed(0))
    steps = {"ours": _ours(preset, args.batch, seq, args.precision, compile_, args.host_memory_reuse),
             "hf": _hf(preset, args.batch, seq, args.precision, compile_)}
    fastest = float("inf")
    for fn in steps.values():
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            fn(ids)
            fastest = min(fastest, time.perf_counter() - t0)
    # each timed sample lasts ≥ min_sample_s (a 25 ms `debug` step × 5 is too short to time on a busy machine)
    n_steps = max(args.steps, math.ceil(getattr(args, "min_sample_s", 1.0) / fastest))
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():  # alternate: ours, hf, ours, hf, ...
            t0 = time.perf_counter()
            for _ in range(n_steps):
                fn(ids)
            rates[name].append(args.batch * seq * n_steps / (time.perf_counter() - t0))
    out = {k: statistics.median(v) for k, v in rates.items()}
    out["ratio"] = out["ours"] / out["hf"]
    out["seq"] = seq
    out["steps"] = n_steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["debug", "seed"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=0, help="0 = the preset's max_seq_len")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (at least)")
    ap.add_argument("--min-sample-s", type=float, default=1.0, help="each round's timed steps last at least this")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    ap.add_argument("--no-host-memory-reuse", dest="host_memory_reuse", action="store_false",
                    help="train.host_memory_reuse: false (both sides then run with glibc's malloc defaults)")
    args = ap.parse_args()
    if args.rounds < MIN_REPEATS:
        ap.error(f"--rounds must be ≥ {MIN_REPEATS} (the median of fewer is noise)")
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} precision={args.precision} batch={args.batch} torch={torch.__version__}")
    print(f"{'preset':8} {'mode':8} {'seq':>4} {'ours tok/s':>11} {'hf tok/s':>11} {'ours/hf':>8}")
    for preset in args.presets:
        for compiled in ([False, True] if args.compile else [False]):
            r = bench(preset, args, compiled)
            mode = "compiled" if compiled else "eager"
            print(f"{preset:8} {mode:8} {int(r['seq']):>4} {r['ours']:>11.0f} {r['hf']:>11.0f} {r['ratio']:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
