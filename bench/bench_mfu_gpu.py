"""GPU MFU of one training step (bf16, one GPU) for a 350M–1B preset, divided by the H100/H200 dense
bf16 peak (989 TFLOP/s). Runs only where CUDA exists (the `device` tool's machines, never CI).

    python -m bench.bench_mfu_gpu --preset 1b --batch 8 --seq-len 2048
    python -m bench.bench_mfu_gpu --quick     # 350m, 3 steps

MFU = model FLOPs per token (`kubellm.model.flops.flops_per_token`, 6N + attention) × tokens/s / peak.
Target (issue 12): ≥ 40%, stretch ≥ 50%.
"""

from __future__ import annotations

import time

from bench.common import Row, emit, load_avg, median, parser

PEAK_TFLOPS = 989.0


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--preset", default="1b", choices=["350m", "1b"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: GPU MFU not measured (run this on a machine with a GPU)")
        return emit([Row("GPU MFU, bf16, one GPU", None, PEAK_TFLOPS, "TFLOP/s", None, "≥ 40%", None,
                         "not measured (no GPU lent to this task)", load_avg(), 0)], args)
    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.model.flops import flops_per_token
    from kubellm.model.loss import causal_lm_loss

    preset = "350m" if args.quick else args.preset
    cfg = get_preset(preset)
    seq = min(args.seq_len, cfg.max_seq_len)
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), device="cuda")
    times = []
    for i in range(3 + (3 if args.quick else 10)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = causal_lm_loss(fwd(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    tps = args.batch * seq / median(times)
    mfu = flops_per_token(cfg, seq) * tps / (PEAK_TFLOPS * 1e12)
    return emit([Row(f"GPU MFU, {preset}, bf16, batch {args.batch} × seq {seq}, {torch.cuda.get_device_name()}",
                     mfu, 0.40, "MFU", mfu / 0.40, "≥ 40%", mfu >= 0.40,
                     f"{tps:,.0f} tokens/s, peak {PEAK_TFLOPS} TFLOP/s", load_avg(), len(times))], args)


if __name__ == "__main__":
    raise SystemExit(main())
