"""`kubellm plan`: pick ZeRO stage, TP, PP, micro-batch and pod resources for a model and GPUs.

    kubellm plan --model 7b --gpus 8 --gpu-mem-gb 80 --seq-len 4096 --global-batch 256
    kubellm plan --params 3e9 --gpus 16 --gpus-per-node 8 --interconnect ib --output plan.yaml

Estimates, per GPU, for every layout dp × tp × pp × ZeRO stage × activation checkpointing ×
micro-batch that the model allows:
  * model states (ZeRO paper, Rajbhandari et al. 2020): with mixed precision 2Ψ params + 2Ψ grads +
    12Ψ optimizer (fp32 master, m, v); fp32 training 4Ψ + 4Ψ + 8Ψ. ZeRO-1 divides the optimizer
    term by dp, ZeRO-2 also the grads, ZeRO-3 everything. Ψ is the per-(tp×pp)-rank parameter count.
  * activations (Korthikanti et al. 2022, "Reducing activation recomputation"): per layer and
    micro-batch s·b·h·(10 + 24/t) bytes with attention scores never materialised (SDPA/flash
    kernels), or 2·s·b·h with full checkpointing (+ one layer's worth during recompute); the first
    pipeline stage holds min(pp, m) micro-batches in flight (1F1B); fp32 logits s·b·V·4/t.
  * communication per step: DP gradient all-reduce (2·(n−1)/n·bytes; ZeRO-3 adds a parameter
    all-gather: ×1.5), TP all-reduces (4 per layer per micro-batch), PP activation sends.
  * the pipeline bubble (p−1)/(m+p−1).
Layouts that fit (≤ `headroom` of GPU memory) are ranked by estimated step time; the best is written
as a run-config fragment (launch: replicas, GPUs, CPU, memory per pod) and the PyTorchJob shape. A request that cannot fit
is refused with the numbers of the closest layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import yaml

from kubellm.core.errors import ConfigError
from kubellm.model.config import PRESETS, ModelConfig, get_preset
from kubellm.model.flops import flops_per_token, num_params

GIB = 1024**3
# Effective bandwidth (GB/s per GPU) of the link each collective crosses.
INTERCONNECTS = {"nvlink": 300.0, "ib": 40.0, "roce": 20.0, "ethernet": 3.0, "pcie": 25.0}


@dataclasses.dataclass(frozen=True)
class Request:
    model: ModelConfig
    gpus: int
    gpu_mem_gb: float = 80.0
    gpus_per_node: int = 8
    seq_len: int = 2048
    global_batch: int = 256
    interconnect: str = "ib"
    precision: str = "bf16"
    peak_tflops: float = 989.0
    mfu: float = 0.4
    headroom: float = 0.9


@dataclasses.dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    zero: int
    micro_batch: int
    act_ckpt: bool
    mem_params_gb: float
    mem_grads_gb: float
    mem_optim_gb: float
    mem_act_gb: float
    mem_total_gb: float
    comm_gb: float
    bubble: float
    step_s: float

    def describe(self) -> str:
        return (f"dp={self.dp} tp={self.tp} pp={self.pp} zero={self.zero} micro={self.micro_batch} "
                f"ckpt={'on' if self.act_ckpt else 'off'}: {self.mem_total_gb:.1f} GB/GPU "
                f"(params {self.mem_params_gb:.1f}, grads {self.mem_grads_gb:.1f}, "
                f"optim {self.mem_optim_gb:.1f}, act {self.mem_act_gb:.1f}), bubble {self.bubble:.0%}, "
                f"comm {self.comm_gb:.1f} GB/step, ~{self.step_s:.2f} s/step")


def model_state_bytes(psi: float, zero: int, dp: int, precision: str) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per GPU for Ψ parameters held by this (tp, pp) rank."""
    p, g, k = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)
    if zero >= 1:
        k = 12  # DeepSpeed's ZeRO optimizers keep an fp32 master partition even over fp32 weights (measured:
        #         bench/bench_zero_memory.py); ZeRO-0 hands the weights to torch's AdamW with no copy
    params, grads, optim = p * psi, g * psi, k * psi
    if zero >= 1:
        optim /= dp
    if zero >= 2:
        grads /= dp
    if zero >= 3:
        params /= dp
    return params, grads, optim


def activation_bytes(cfg: ModelConfig, seq: int, micro: int, tp: int, pp: int, m: int, ckpt: bool,
                     precision: str) -> float:
    s, b, h = seq, micro, cfg.dim
    scale = 1.0 if precision in ("bf16", "fp16") else 2.0
    layers = math.ceil(cfg.n_layers / pp)
    per_layer_full = s * b * h * (10 + 24 / tp) * scale
    per_layer = 2 * s * b * h * scale if ckpt else per_layer_full
    in_flight = min(pp, m)
    act = layers * per_layer * in_flight + (per_layer_full if ckpt else 0)
    logits = s * b * cfg.vocab_size * 4 / tp  # fp32 logits for the loss, on the last stage
    return act + logits


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(req: Request) -> list[Layout]:
    cfg = req.model
    total = num_params(cfg)
    flops_tok = flops_per_token(cfg, req.seq_len)
    bw = INTERCONNECTS[req.interconnect] * 1e9
    nvlink = INTERCONNECTS["nvlink"] * 1e9
    out = []
    for tp in _divisors(min(req.gpus, req.gpus_per_node)):
        if cfg.n_heads % tp or cfg.kv_heads % tp:
            continue
        for pp in _divisors(req.gpus // tp):
            if pp > cfg.n_layers or req.gpus % (tp * pp):
                continue
            dp = req.gpus // (tp * pp)
            if req.global_batch % dp:
                continue
            psi = total / (tp * pp)
            for zero in (0, 1, 2, 3):
                if pp > 1 and zero > 1:
                    continue  # DeepSpeed: ZeRO-2/3 do not combine with pipeline parallelism
                for micro in (1, 2, 4, 8, 16):
                    if (req.global_batch // dp) % micro:
                        continue
                    m = req.global_batch // (dp * micro)
                    if pp > 1 and m < pp:
                        continue  # fewer micro-batches than stages leaves stages idle
                    for ckpt in (False, True):
                        pb, gb, ob = model_state_bytes(psi, zero, dp, req.precision)
                        ab = activation_bytes(cfg, req.seq_len, micro, tp, pp, m, ckpt, req.precision)
                        totb = (pb + gb + ob + ab) * 1.08 + 1.5 * GIB  # allocator + CUDA context
                        bytes_p = 2 if req.precision in ("bf16", "fp16") else 4
                        dp_comm = 2 * (dp - 1) / dp * psi * bytes_p * (1.5 if zero == 3 else 1.0) if dp > 1 else 0
                        tp_comm = (4 * cfg.n_layers / pp * m * req.seq_len * micro * cfg.dim * bytes_p
                                   * 2 * (tp - 1) / tp) if tp > 1 else 0
                        pp_comm = 2 * m * req.seq_len * micro * cfg.dim * bytes_p if pp > 1 else 0
                        bubble = (pp - 1) / (m + pp - 1)
                        tokens = req.global_batch * req.seq_len
                        compute = tokens * flops_tok * (4 / 3 if ckpt else 1) / (
                            req.gpus * req.peak_tflops * 1e12 * req.mfu)
                        tp_bw = nvlink if tp <= req.gpus_per_node else bw
                        step = compute / (1 - bubble) + dp_comm / bw + tp_comm / tp_bw + pp_comm / bw
                        out.append(Layout(dp, tp, pp, zero, micro, ckpt, pb / GIB, gb / GIB, ob / GIB,
                                          ab / GIB, totb / GIB, (dp_comm + tp_comm + pp_comm) / 1e9,
                                          bubble, step))
    return out


def plan(req: Request, top: int = 5) -> list[Layout]:
    """The layouts that fit, best first. Raises ConfigError (with numbers) when none does."""
    if req.gpus < 1:
        raise ConfigError(f"--gpus {req.gpus}: need at least one GPU")
    if req.gpus > req.gpus_per_node and req.gpus % req.gpus_per_node:
        raise ConfigError(f"--gpus {req.gpus} is not a multiple of --gpus-per-node {req.gpus_per_node}")
    if req.interconnect not in INTERCONNECTS:
        raise ConfigError(f"--interconnect {req.interconnect!r}: expected one of {', '.join(INTERCONNECTS)}")
    layouts = enumerate_layouts(req)
    if not layouts:
        raise ConfigError(f"no dp×tp×pp layout of {req.gpus} GPUs divides the model "
                          f"(heads {req.model.n_heads}, kv heads {req.model.kv_heads}, "
                          f"layers {req.model.n_layers}) and global batch {req.global_batch}")
    cap = req.gpu_mem_gb * req.headroom
    # Fastest first; among layouts within 1% of each other (the estimate's resolution) the simplest
    # (least model parallelism), then the one with the most memory headroom.
    fit = sorted((lay for lay in layouts if lay.mem_total_gb <= cap),
                 key=lambda lay: (round(math.log(lay.step_s) / math.log(1.01)), lay.tp * lay.pp,
                                  lay.mem_total_gb))
    if not fit:
        best = min(layouts, key=lambda lay: lay.mem_total_gb)
        raise ConfigError(
            f"{num_params(req.model) / 1e9:.2f}B parameters do not fit {req.gpus} × {req.gpu_mem_gb:g} GB: "
            f"the smallest layout needs {best.mem_total_gb:.1f} GB per GPU > {cap:.1f} GB usable "
            f"({best.describe()}). Add GPUs, use larger ones, or shorten the sequence."
        )
    return fit[:top]


def to_fragment(req: Request, lay: Layout) -> dict[str, Any]:
    """The chosen layout as a run-config fragment (valid `RunConfig` YAML: merge it into yours)."""
    nnodes = max(1, req.gpus // req.gpus_per_node)
    per_node = min(req.gpus, req.gpus_per_node)
    return {
        "pretrain": {
            "train": {
                "zero_stage": lay.zero,
                "micro_batch_size": lay.micro_batch,
                "global_batch_size": req.global_batch,
                "seq_len": req.seq_len,
                "precision": req.precision,
                "activation_checkpointing": lay.act_ckpt,
            },
            "parallel": {"dp": lay.dp, "tp": lay.tp, "pp": lay.pp},
            "launch": {
                "backend": "pytorchjob", "nproc_per_node": per_node, "nnodes": nnodes,
                # per pod: all its GPUs, 8 CPU cores per GPU, and host memory for loader workers,
                # pinned transfer buffers and node-local checkpoint staging (~24 GiB per GPU)
                "gpu": per_node, "cpu": 8 * per_node, "memory_mb": max(64, 24 * per_node) * 1024,
            },
        },
    }


def pytorchjob_shape(frag: dict[str, Any]) -> str:
    launch = frag["pretrain"]["launch"]
    return (f"# PyTorchJob: Master 1 + Worker {launch['nnodes'] - 1}, each {launch['gpu']} × nvidia.com/gpu, "
            f"{launch['cpu']} CPU, {launch['memory_mb'] // 1024}Gi memory, nprocPerNode {launch['nproc_per_node']}\n")


def configure(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", choices=sorted(PRESETS), help="a model preset")
    g.add_argument("--params", type=float, help="a parameter count (e.g. 3e9); shape scaled like Llama")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU (GB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (pod)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length")
    p.add_argument("--global-batch", type=int, default=256, help="sequences per optimizer step")
    p.add_argument("--interconnect", default="ib", choices=sorted(INTERCONNECTS), help="inter-node link")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak per GPU (H100/H200 bf16: 989)")
    p.add_argument("--top", type=int, default=5, help="how many ranked layouts to print")
    p.add_argument("--output", help="write the chosen layout's run-config fragment (YAML) here")


def model_for_params(n: float) -> ModelConfig:
    """A Llama-shaped config with about `n` parameters (dim multiple of 128, 128-dim heads)."""
    best = None
    for layers in range(8, 97, 2):
        dim = int(round(math.sqrt(n / (12 * layers)) / 128)) * 128
        if dim < 256:
            continue
        cfg = ModelConfig(vocab_size=32000, dim=dim, n_layers=layers, n_heads=dim // 128,
                          ffn_dim=int(dim * 8 / 3 / 256 + 0.999) * 256, max_seq_len=4096)
        err = abs(num_params(cfg) - n)
        if best is None or err < best[0]:
            best = (err, cfg)
    assert best is not None
    return best[1]


def main(args: argparse.Namespace) -> int:
    cfg = get_preset(args.model) if args.model else model_for_params(args.params)
    cfg = cfg.with_(max_seq_len=max(cfg.max_seq_len, args.seq_len))
    req = Request(model=cfg, gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, gpus_per_node=args.gpus_per_node,
                  seq_len=args.seq_len, global_batch=args.global_batch, interconnect=args.interconnect,
                  precision=args.precision, peak_tflops=args.peak_tflops)
    layouts = plan(req, top=args.top)
    print(f"model: {num_params(cfg) / 1e9:.2f}B parameters ({cfg.n_layers} layers, dim {cfg.dim}, "
          f"{cfg.n_heads} heads / {cfg.kv_heads} kv); {req.gpus} × {req.gpu_mem_gb:g} GB GPUs")
    for i, lay in enumerate(layouts, 1):
        print(f"{i}. {lay.describe()}")
    fragment = to_fragment(req, layouts[0])
    frag = pytorchjob_shape(fragment) + yaml.safe_dump(fragment, sort_keys=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(frag)
        print(f"wrote {args.output}")
    else:
        print("--- chosen layout (run-config fragment; the PyTorchJob shape in the comment) ---")
        print(frag, end="")
    return 0


if __name__ == "__main__":
    from kubellm.cli import main as cli_main

    sys.exit(cli_main(["plan", *sys.argv[1:]]))
