"""`kubellm plan`: pick ZeRO stage, TP, PP, micro-batch and pod resources for a model and GPUs.

    kubellm plan --model 7b --gpus 8 --gpu-mem-gb 80 --seq-len 4096 --global-batch 256
    kubellm plan --params 3e9 --gpus 16 --gpus-per-node 8 --interconnect ib --output plan.yaml

Estimates, per GPU, for every layout dp × tp × pp × ZeRO stage × activation checkpointing ×
micro-batch that the model allows:
  * model states (ZeRO paper, Rajbhandari et al. 2020): with mixed precision 2Ψ params + 2Ψ grads +
    12Ψ optimizer (fp32 master, m, v); fp32 training 4Ψ + 4Ψ + 8Ψ (12Ψ at ZeRO ≥ 1: DeepSpeed keeps
    an fp32 master partition even over fp32 weights). ZeRO-1 divides the optimizer term by dp,
    ZeRO-3 everything. ZeRO-2 gradients are what DeepSpeed holds, not the paper's Ψ/dp: the gradient
    of every *whole* parameter that overlaps the rank's partition (`zero2_grad_elements`). Ψ is the
    parameter count of the busiest (tp, pp) rank: pipeline stages split the layers as DeepSpeed's
    default "parameters" partition does (`pipeline_stages`: its `partition_balanced` over each layer's
    parameters), and with tied embeddings both end stages hold the table. ZeRO ≥ 1 adds DeepSpeed's
    gradient reduce bucket (`dsconfig.zero_buffer_sizes`: dim² elements) to the gradients.
  * activations: the tensors autograd saves in our block (`layer_activation_bytes`: RMSNorm with
    fp32 internals, fused qkv, RoPE, SDPA/flash (no scores), SwiGLU; GQA and any ffn_dim), checked
    against saved-tensor hooks in tests/planner and bench/bench_zero_memory.py; with full
    checkpointing only each block's input (+ one block's worth during recompute); pipeline stage s
    holds min(pp − s, m) micro-batches in flight (1F1B); the last stage also the LM head and loss
    (`head_bytes`: the fused chunked head at tp = pp = 1, full fp32 log-probs otherwise). A layout's
    memory is that of its fullest stage.
  * communication per step: DP gradient all-reduce (2·(n−1)/n·bytes; ZeRO-3 adds a parameter
    all-gather: ×1.5), TP all-reduces (4 per layer per micro-batch), PP activation sends. Each is
    timed at the bandwidth of the link it crosses (`collective_spans_nodes`): ranks are placed in
    the worker's order (`kubellm.training.topology`: axes pipe, data, model; model fastest) onto
    nodes of `gpus_per_node` consecutive ranks; a collective whose group (DP) or neighbour pair (PP)
    lies inside one node runs at the intra-node NVLink speed, one that spans nodes at
    `--interconnect`'s (the slowest group or hop sets the pace: no hierarchical all-reduce modelled).
    TP groups are always inside a node (tp divides gpus_per_node). A single-node job never uses
    `--interconnect`.
  * the pipeline bubble (p−1)/(m+p−1), and the stages' compute imbalance: a step runs at the pace
    of the stage with the most forward FLOPs (pp × its share of the total).
Layouts that fit (≤ `headroom` of GPU memory) are ranked by estimated step time; the best is written
as a run-config fragment (launch: replicas, GPUs, CPU, memory per pod) and the PyTorchJob shape. A request that cannot fit
is refused with the numbers of the closest layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from kubellm.core.errors import ConfigError, StorageError
from kubellm.model.config import PRESETS, ModelConfig, get_preset
from kubellm.model.flops import flops_per_token, num_params
from kubellm.model.loss import chunk_rows
from kubellm.training.config import ParallelConfig, TrainConfig
from kubellm.training.dsconfig import zero_buffer_sizes
from kubellm.training.topology import validate_layout

GIB = 1024**3
# Effective bandwidth (GB/s per GPU) of the link each collective crosses.
INTERCONNECTS = {"nvlink": 300.0, "ib": 40.0, "roce": 20.0, "ethernet": 3.0, "pcie": 25.0}
PRECISIONS = ("bf16", "fp16", "fp32")

# Ranges of the flags (checked in `Request.__post_init__` and `main`). The lower bounds are what a layout needs;
# the upper ones keep the arithmetic finite and the search short, far beyond any real cluster.
MAX_GPUS = 1 << 20
SEQ_LEN_MIN = next(m.ge for m in TrainConfig.model_fields["seq_len"].metadata if hasattr(m, "ge"))
"""The shortest sequence pretrain accepts (`train.seq_len`)."""
MAX_SEQ_LEN = 1 << 24
MAX_GLOBAL_BATCH = 1 << 24
MAX_PEAK_TFLOPS = 1e5
PARAMS_RANGE = (5e7, 1e13)
"""`--params`: below 50M the Llama-shaped search (`model_for_params`: dim ≥ 256, 8–96 layers, a
32000-token vocabulary) cannot come within 5% of the request."""


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _check_int(flag: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"a whole number from {lo:,} to {hi:,}" if hi is not None else f"a whole number ≥ {lo:,}"
        raise ConfigError(f"{flag} {_shown(value)}: must be {allowed}")


def _check_positive(flag: str, value: object, hi: float | None = None) -> None:
    ok = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
          and (hi is None or value <= hi))
    if not ok:
        allowed = f"a number > 0 and ≤ {hi:g}" if hi is not None else "a finite number > 0"
        raise ConfigError(f"{flag} {_shown(value)}: must be {allowed}")


@dataclasses.dataclass(frozen=True)
class Request:
    """What to plan for. Every value is checked on construction (ConfigError naming the flag)."""

    model: ModelConfig
    gpus: int
    gpu_mem_gb: float = 80.0
    """Memory per GPU in GiB (what nvidia-smi reports in MiB, / 1024)."""
    gpus_per_node: int = 8
    seq_len: int = 2048
    global_batch: int = 256
    interconnect: str = "ib"
    precision: str = "bf16"
    peak_tflops: float = 989.0
    mfu: float = 0.4
    headroom: float = 0.9
    preset: str | None = None
    """The preset `model` was made from (written as `pretrain.model.preset`); None = the nearest."""

    def __post_init__(self) -> None:
        _check_int("--gpus", self.gpus, 1, MAX_GPUS)
        _check_int("--gpus-per-node", self.gpus_per_node, 1)
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ConfigError(f"--gpus {self.gpus} is not a multiple of --gpus-per-node {self.gpus_per_node}: "
                              "a job larger than one node fills whole nodes")
        _check_positive("--gpu-mem-gb", self.gpu_mem_gb)
        _check_int("--seq-len", self.seq_len, SEQ_LEN_MIN, MAX_SEQ_LEN)
        _check_int("--global-batch", self.global_batch, 1, MAX_GLOBAL_BATCH)
        if self.interconnect not in INTERCONNECTS:
            raise ConfigError(f"--interconnect {self.interconnect!r}: expected one of {', '.join(INTERCONNECTS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        _check_positive("--peak-tflops", self.peak_tflops, MAX_PEAK_TFLOPS)
        _check_positive("Request.mfu", self.mfu, 1.0)
        _check_positive("Request.headroom", self.headroom, 1.0)
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"--model {self.preset!r}: expected one of {', '.join(PRESETS)}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One layout and its estimates: memory per GPU in GiB (2**30 bytes), communication in GB (1e9)."""

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
                f"ckpt={'on' if self.act_ckpt else 'off'}: {self.mem_total_gb:.1f} GiB/GPU "
                f"(params {self.mem_params_gb:.1f}, grads {self.mem_grads_gb:.1f}, "
                f"optim {self.mem_optim_gb:.1f}, act {self.mem_act_gb:.1f}), bubble {self.bubble:.0%}, "
                f"comm {self.comm_gb:.1f} GB/step, ~{self.step_s:.2f} s/step")


def param_group_sizes(cfg: ModelConfig, tp: int = 1, decay_embeddings: bool = False) -> list[list[int]]:
    """The element counts of one TP rank's parameters, per optimizer parameter group, in the order
    `kubellm.training.optim.param_groups` hands them to DeepSpeed (weight-decayed matrices, then
    the no-decay norms and embeddings; each in `named_parameters` order, a tied weight once)."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv, f, v = cfg.n_heads * hd // tp, cfg.kv_heads * hd // tp, cfg.ffn_dim // tp, cfg.vocab_size // tp
    decay: list[int] = []
    no_decay: list[int] = []
    (decay if decay_embeddings else no_decay).append(v * d)  # tok_embeddings
    for _ in range(cfg.n_layers):
        no_decay.append(d)  # attn_norm
        decay += [(q + 2 * kv) * d, d * q]  # attn.qkv, attn.out
        no_decay.append(d)  # ffn_norm
        decay += [2 * f * d, d * f]  # ffn.gate_up, ffn.down
    no_decay.append(d)  # norm
    if not cfg.tie_embeddings:
        decay.append(v * d)  # output
    return [g for g in (decay, no_decay) if g]


def zero2_grad_elements(groups: Sequence[Sequence[int]], dp: int) -> int:
    """Gradient elements the busiest rank holds after a ZeRO-2 backward in DeepSpeed (0.19.8,
    `deepspeed/runtime/zero/stage_1_and_2.py`).

    Each parameter group is flattened and padded to a multiple of 2·dp elements, and rank r owns
    [r·size, (r+1)·size) of it (`get_partition_info`: a parameter is "in" the partition when it
    starts inside it or straddles its start). With `contiguous_gradients` (the default), the
    reduced gradient of every parameter in the partition is copied whole into `grads_in_partition`
    (`copy_grads_in_partition`, sized to the sum of those parameters' numel); the epilogue
    (`independent_gradient_partition_epilogue` → `_release_ipg_buffers`) drops that name, but
    `averaged_gradients` (`get_flat_partition` views of it) keeps the storage alive until the step.
    Gradients of the other parameters are freed (`clear_grad_attribute`). So a rank holds Ψ/dp plus
    the parts of its boundary parameters that lie outside its partition — with a few large
    parameters (embedding, LM head) and small dp, up to Ψ.

    The gradient dtype is the model's: kubellm's DeepSpeed config sets no `data_types.grad_accum_dtype`,
    so `engine.get_data_types` makes it the model dtype (fp32, or bf16/fp16 weights in
    DeepSpeed's bf16/fp16 modes) and `_use_compact_grad_partition_buffer` (an fp32 partition-sized
    buffer, only when the accumulation dtype is fp32 and differs from the model's) is not used."""
    held = [0] * dp
    for sizes in groups:
        total = sum(sizes)
        align = 2 * dp  # nccl_start_alignment_factor (2) × dp
        size = math.ceil(total / align) * align // dp
        start = 0
        for n in sizes:
            if n:
                for r in range(start // size, min(dp - 1, (start + n - 1) // size) + 1):
                    held[r] += n
            start += n
    return max(held)


def model_state_bytes(psi: float, zero: int, dp: int, precision: str,
                      groups: Sequence[Sequence[int]] | None = None, bucket: int = 0) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per GPU for Ψ parameters held by this (tp, pp) rank.

    `groups` (`param_group_sizes`): the rank's parameters per optimizer group, for ZeRO-2's
    gradients as DeepSpeed holds them (`zero2_grad_elements`); without it ZeRO-2 uses the paper's
    Ψ/dp, a lower bound. `bucket`: ZeRO ≥ 1's gradient reduce bucket in elements
    (`dsconfig.zero_buffer_sizes`), a buffer in the gradients' dtype counted with the gradients."""
    p, g, k = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)
    if zero >= 1:
        k = 12  # DeepSpeed's ZeRO optimizers keep an fp32 master partition even over fp32 weights (measured:
        #         bench/bench_zero_memory.py); ZeRO-0 hands the weights to torch's AdamW with no copy
    params, grads, optim = p * psi, g * psi, k * psi
    if zero >= 1:
        optim /= dp
    if zero == 2:
        grads = g * zero2_grad_elements(groups, dp) if groups is not None else grads / dp
    if zero >= 3:
        grads /= dp
        params /= dp
    if zero >= 1:
        grads += g * bucket
    return params, grads, optim


def _act_bytes(precision: str) -> int:
    """Bytes per element of activations: 2 in DeepSpeed's bf16/fp16 modes (weights and activations
    in that dtype), 4 in fp32."""
    return 2 if precision in ("bf16", "fp16") else 4


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, precision: str) -> float:
    """Bytes autograd saves for one `kubellm.model.transformer.Block` over `tokens` = micro × seq
    tokens on one TP rank (q/kv heads and ffn_dim split tp ways, norms replicated).

    Per token, with D = dim, Q = n_heads·head_dim/tp, K = kv_heads·head_dim/tp, F = ffn_dim/tp,
    H = n_heads/tp and a = activation bytes (4 fp32; 2 bf16/fp16):
      * each RMSNorm (×2): its input in fp32 (4D; the input itself at fp32, a copy at bf16), the
        rsqrt (4), x·rsqrt (a·D: the fp32 product at fp32, its bf16 cast at bf16) and the weighted
        output (a·D, the next linear's input) — 4D + 4 + 2aD;
      * attention: the fused qkv output (Q + 2K: RoPE keeps its q|k halves, SDPA its v view), the
        rotated q|k (Q + K), SDPA's output (Q; the flash kernels write it (B, T, H, hd), so the
        out-projection's input is a view of it) and log-sum-exp (fp32, H); no T×T scores;
      * SwiGLU: gate|up (2F), silu(gate) (F), the product (F, down's input).
    Total: 2·(4D + 4 + 2aD) + a·(3Q + 3K + 4F) + 4H. Residual adds and row-parallel all-reduces save
    nothing. Exact at fp32 on CPU (tests/planner). bf16/fp16 assume DeepSpeed's bf16/fp16 mode:
    linear inputs/outputs in 2 bytes, RMSNorm internals in fp32 (as written in `RMSNorm.forward`);
    bench/bench_zero_memory.py measures the bf16 case in DeepSpeed's bf16 mode on CPU (CPU's flash
    SDPA kernel). Under CUDA's math SDPA backend (no flash/efficient/cuDNN kernel) add Q for a
    copied attention output and the B·H·T² scores."""
    a = _act_bytes(precision)
    d, hd = cfg.dim, cfg.head_dim
    q, kv, f, h = cfg.n_heads * hd / tp, cfg.kv_heads * hd / tp, cfg.ffn_dim / tp, cfg.n_heads / tp
    norm = 4 * d + 4 + 2 * a * d
    return tokens * (2 * norm + a * (3 * q + 3 * kv + 4 * f) + 4 * h)


def head_bytes(cfg: ModelConfig, tokens: int, tp: int, pp: int, precision: str,
               transient: bool = True) -> float:
    """Bytes for the embedding lookup, the final norm, the LM head and the loss over `tokens`.

    tp = pp = 1 uses the fused chunked head (`model(ids, labels=...)`, `linear_cross_entropy`): it saves
    dh (tokens × dim, activation dtype) and dw (vocab × dim, fp32), not the logits, and the final
    norm's output is not kept; while it runs it holds one chunk of fp32 logits (`chunk_rows` on
    CUDA, ~256 MiB; + its bf16 copy). Tensor- and pipeline-parallel models compute the loss from full
    logits (`VocabParallelOutput` gathers all V columns on every TP rank; the pipeline's last stage
    runs `causal_lm_loss`): fp32 log-probs (tokens × V × 4) saved, and in the forward the logits
    and their fp32 copy at the same time. `transient` adds those working sets (a peak at the end of
    the forward, on top of everything saved); without it, only what autograd saves."""
    a = _act_bytes(precision)
    d, v = cfg.dim, cfg.vocab_size
    final_norm = 4 * d + 4 + a * d  # fp32 input, rsqrt, x·rsqrt (the weighted output: see below)
    ids = 8  # int64 token ids, kept by the embedding's backward
    if tp == 1 and pp == 1:
        saved = tokens * (final_norm + a * d + ids) + v * d * 4  # + dh; dw in fp32
        rows = min(tokens, chunk_rows(v, torch.device("cuda")))
        work = rows * v * (4 + (a if a != 4 else 0))
    else:
        saved = tokens * (final_norm + a * d + 2 * ids + v * 4)  # output kept by the linear; labels
        work = tokens * v * (a + (4 if a != 4 else 0))
    return saved + (work if transient else 0)


def stage_activation_bytes(cfg: ModelConfig, seq: int, micro: int, tp: int, pp: int, blocks: int, in_flight: int,
                           has_head: bool, ckpt: bool, precision: str, transient: bool = True) -> float:
    """Activation bytes of one pipeline stage holding `blocks` blocks and `in_flight` micro-batches
    (1F1B: stage s holds min(pp − s, m)), plus the LM head's if it is the last stage. With full
    activation checkpointing each block keeps only its input (a·D per token) and one block's full set
    exists during its recompute. `transient=False`: only what autograd saves (what
    bench/bench_zero_memory.py measures)."""
    tokens = seq * micro
    per_layer_full = layer_activation_bytes(cfg, tokens, tp, precision)
    per_layer = tokens * cfg.dim * _act_bytes(precision) if ckpt else per_layer_full
    act = blocks * per_layer * in_flight + (per_layer_full if ckpt and blocks else 0)
    return act + (head_bytes(cfg, tokens, tp, pp, precision, transient) if has_head else 0)


def activation_bytes(cfg: ModelConfig, seq: int, micro: int, tp: int, pp: int, m: int, ckpt: bool,
                     precision: str, transient: bool = True) -> float:
    """Activation bytes of the pipeline stage that holds the most (`stage_activation_bytes` of each
    stage of `pipeline_stages`); at pp = 1, the whole model's."""
    return max(stage_activation_bytes(cfg, seq, micro, tp, pp, st.blocks, min(pp - s, m), s == pp - 1, ckpt,
                                      precision, transient)
               for s, st in enumerate(pipeline_stages(cfg, tp, pp)))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage on one TP rank: its parameters, blocks and forward FLOPs per token."""

    params: int
    blocks: int
    flops: int


def pipeline_layer_params(cfg: ModelConfig, tp: int) -> list[int]:
    """Trainable parameters of each DeepSpeed pipeline layer on one TP rank, as its `PipelineModule`
    counts them (`kubellm.training.pipeline.layer_specs`: embedding, blocks, final norm, head). With
    tied embeddings the head is the tied embedding built again, so it counts the table too: both end
    stages hold a copy (DeepSpeed all-reduces their gradients)."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv, f, v = cfg.n_heads * hd // tp, cfg.kv_heads * hd // tp, cfg.ffn_dim // tp, cfg.vocab_size // tp
    block = 2 * d + (q + 2 * kv) * d + d * q + 2 * f * d + d * f
    return [v * d, *[block] * cfg.n_layers, d, v * d]


_STAGES: dict[tuple[str, int, int, int], tuple[Stage, ...]] = {}


def pipeline_stages(cfg: ModelConfig, tp: int, pp: int, seq_len: int = 1) -> tuple[Stage, ...]:
    """The stages of the pipeline under DeepSpeed's default "parameters" partition
    (`deepspeed.runtime.utils.partition_balanced` over `pipeline_layer_params`, which the engine's
    `PipelineModule` calls); at pp = 1 one stage with the model's unique parameters. Each stage's forward
    FLOPs per token include attention at `seq_len`, which grows with it while the head's does not."""
    from kubellm.model.flops import layer_forward_flops

    key = (cfg.model_dump_json(), tp, pp, seq_len)
    if key in _STAGES:
        return _STAGES[key]
    if pp == 1:  # one TP rank's unique parameters (a tied table once; norms replicated, not split)
        stages: tuple[Stage, ...] = (Stage(sum(map(sum, param_group_sizes(cfg, tp))), cfg.n_layers, 0),)
    else:
        from deepspeed.runtime.utils import partition_balanced

        weights = pipeline_layer_params(cfg, tp)
        emb, block, norm, head = layer_forward_flops(cfg, seq_len)
        costs = [emb, *[block] * cfg.n_layers, norm, head]
        bounds = partition_balanced(weights, pp)
        stages = tuple(Stage(sum(weights[a:b]), sum(1 for i in range(a, b) if 1 <= i <= cfg.n_layers),
                             sum(costs[a:b])) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    _STAGES[key] = stages
    return stages


def dp_comm_bytes(psi: float, bytes_p: int, dp: int, zero: int, m: int) -> float:
    """Bytes each rank moves over its data-parallel group per optimizer step of `m` micro-batches (ring
    collectives: (dp-1)/dp of the payload per pass). ZeRO 0/1 reduce the gradients once per step (an
    all-reduce, two passes). ZeRO-2 keeps only its gradient partition, so it reduce-scatters at every
    micro-batch (DeepSpeed: "ZeRO stage >= 2 communicates during non gradient accumulation boundaries
    as well"), then all-gathers the updated parameters once. ZeRO-3 all-gathers the parameters for
    forward and again for backward, and reduce-scatters the gradients, at every micro-batch."""
    if dp <= 1:
        return 0.0
    one_pass = (dp - 1) / dp * psi * bytes_p
    return one_pass * {0: 2, 1: 2, 2: m + 1, 3: 3 * m}[zero]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _layout_allowed(req: Request, dp: int, tp: int, pp: int, zero: int, micro: int) -> bool:
    """Whether pretrain would start this layout: the worker's own check (`validate_layout`: tp divides
    heads, KV heads, FFN and vocabulary; pp ≤ layers; ZeRO ≤ 1 with pp > 1; global = micro × accum × dp)."""
    train = TrainConfig(zero_stage=zero, micro_batch_size=micro, global_batch_size=req.global_batch,
                        seq_len=req.seq_len, precision=req.precision)
    try:
        validate_layout(req.model, train, ParallelConfig(dp=dp, tp=tp, pp=pp), req.gpus)
    except ConfigError:
        return False
    return True


def collective_spans_nodes(gpus_per_node: int, dp: int, tp: int, pp: int) -> tuple[bool, bool]:
    """(whether some DP group spans nodes, whether some pair of neighbouring pipeline stages does).

    Global rank = stage·dp·tp + dp_rank·tp + tp_rank (DeepSpeed's `PipeModelDataParallelTopology`,
    as `kubellm.training.topology` builds it) and node = rank // gpus_per_node. Stage s holds the
    block [s·B, (s+1)·B) with B = dp·tp, and its DP groups (stride tp) cover the block from end to
    end; a node boundary inside the block therefore splits one of them (boundaries are multiples of
    tp, as tp divides gpus_per_node). Stage s sends rank r to r + B, so a hop s → s+1 crosses nodes
    when a node boundary lies in (s·B, s·B + 2B − 1]."""
    block = dp * tp
    dp_spans = dp > 1 and any(s * block // gpus_per_node != ((s + 1) * block - 1) // gpus_per_node
                              for s in range(pp))
    pp_spans = any(s * block // gpus_per_node != (s * block + 2 * block - 1) // gpus_per_node
                   for s in range(pp - 1))
    return dp_spans, pp_spans


def enumerate_layouts(req: Request) -> list[Layout]:
    cfg = req.model
    flops_tok = flops_per_token(cfg, req.seq_len)
    inter = INTERCONNECTS[req.interconnect] * 1e9
    bucket = zero_buffer_sizes(cfg)["reduce_bucket_size"]
    nvlink = INTERCONNECTS["nvlink"] * 1e9  # within a node
    out = []
    for tp in _divisors(min(req.gpus, req.gpus_per_node)):  # TP stays inside a node
        for pp in _divisors(req.gpus // tp):
            dp = req.gpus // (tp * pp)
            stages: tuple[Stage, ...] = ()  # computed once the layout is allowed
            imbalance = 1.0
            groups = None  # used for ZeRO-2 (pp = 1)
            dp_bw = pp_bw = nvlink  # likewise: the links the DP and PP traffic cross
            for zero in (0, 1, 2, 3):
                for micro in (1, 2, 4, 8, 16):
                    if not _layout_allowed(req, dp, tp, pp, zero, micro):
                        continue
                    m = req.global_batch // (dp * micro)
                    if pp > 1 and m < pp:
                        continue  # fewer micro-batches than stages leaves stages idle
                    if groups is None:
                        groups = param_group_sizes(cfg, tp)
                        stages = pipeline_stages(cfg, tp, pp, req.seq_len)
                        # a step runs at the pace of the stage with the most compute
                        imbalance = pp * max(st.flops for st in stages) / sum(st.flops for st in stages) \
                            if pp > 1 else 1.0
                        dp_spans, pp_spans = collective_spans_nodes(req.gpus_per_node, dp, tp, pp)
                        dp_bw = inter if dp_spans else nvlink
                        pp_bw = inter if pp_spans else nvlink
                    for ckpt in (False, True):
                        # the fullest stage: model states of its parameters + its activations
                        per_stage = []
                        for si, st in enumerate(stages):
                            pb, gb, ob = model_state_bytes(st.params, zero, dp, req.precision, groups, bucket)
                            ab = stage_activation_bytes(cfg, req.seq_len, micro, tp, pp, st.blocks, min(pp - si, m),
                                                        si == pp - 1, ckpt, req.precision)
                            per_stage.append((pb + gb + ob + ab, pb, gb, ob, ab))
                        _, pb, gb, ob, ab = max(per_stage)
                        totb = (pb + gb + ob + ab) * 1.08 + 1.5 * GIB  # allocator + CUDA context
                        bytes_p = 2 if req.precision in ("bf16", "fp16") else 4
                        psi = max(st.params for st in stages)  # the slowest gradient reduction
                        dp_comm = dp_comm_bytes(psi, bytes_p, dp, zero, m)
                        tp_comm = (4 * cfg.n_layers / pp * m * req.seq_len * micro * cfg.dim * bytes_p
                                   * 2 * (tp - 1) / tp) if tp > 1 else 0
                        pp_comm = 2 * m * req.seq_len * micro * cfg.dim * bytes_p if pp > 1 else 0
                        bubble = (pp - 1) / (m + pp - 1)
                        tokens = req.global_batch * req.seq_len
                        compute = tokens * flops_tok * (4 / 3 if ckpt else 1) * imbalance / (
                            req.gpus * req.peak_tflops * 1e12 * req.mfu)
                        # TP groups are tp consecutive ranks and tp divides gpus_per_node: one node
                        step = compute / (1 - bubble) + dp_comm / dp_bw + tp_comm / nvlink + pp_comm / pp_bw
                        out.append(Layout(dp, tp, pp, zero, micro, ckpt, pb / GIB, gb / GIB, ob / GIB,
                                          ab / GIB, totb / GIB, (dp_comm + tp_comm + pp_comm) / 1e9,
                                          bubble, step))
    return out


def plan(req: Request, top: int = 5) -> list[Layout]:
    """The layouts that fit, best first. Raises ConfigError (with numbers) when none does."""
    _check_int("--top", top, 1)
    layouts = enumerate_layouts(req)
    if not layouts:
        raise ConfigError(f"no dp×tp×pp layout of {req.gpus} GPUs divides the model "
                          f"(heads {req.model.n_heads}, kv heads {req.model.kv_heads}, ffn_dim {req.model.ffn_dim}, "
                          f"vocab_size {req.model.vocab_size}, layers {req.model.n_layers}) and global batch "
                          f"{req.global_batch} (micro-batches of 1–16, at least pp of them per step)")
    cap = req.gpu_mem_gb * req.headroom
    # Fastest first; among layouts within 1% of each other (the estimate's resolution) the simplest
    # (least model parallelism), then the one with the most memory headroom.
    fit = sorted((lay for lay in layouts if lay.mem_total_gb <= cap),
                 key=lambda lay: (round(math.log(lay.step_s) / math.log(1.01)), lay.tp * lay.pp,
                                  lay.mem_total_gb))
    if not fit:
        best = min(layouts, key=lambda lay: lay.mem_total_gb)
        raise ConfigError(
            f"{num_params(req.model) / 1e9:.2f}B parameters do not fit {req.gpus} × {req.gpu_mem_gb:g} GiB: "
            f"the smallest layout needs {best.mem_total_gb:.1f} GiB per GPU > {cap:.1f} GiB usable "
            f"({best.describe()}). Add GPUs, use larger ones, or shorten the sequence."
        )
    return fit[:top]


def model_spec(cfg: ModelConfig, preset: str | None = None) -> dict[str, Any]:
    """`cfg` as a `pretrain.model` section: `preset` (default: the preset nearest in parameter count)
    and, as `overrides`, every field where `cfg` differs from it — so `ModelSpec.build()` gives `cfg`."""
    if preset is None:
        n = num_params(cfg)
        preset = min(PRESETS, key=lambda name: abs(math.log(num_params(get_preset(name)) / n)))
    base = get_preset(preset).model_dump()
    overrides = {k: v for k, v in cfg.model_dump().items() if base[k] != v}
    return {"preset": preset, "overrides": overrides} if overrides else {"preset": preset}


def to_fragment(req: Request, lay: Layout) -> dict[str, Any]:
    """The chosen layout as a run-config fragment (valid `RunConfig` YAML: merge it into yours): the
    model it was planned for (`pretrain.model`), the batch, precision and ZeRO stage, the layout and
    the pods."""
    nnodes = max(1, req.gpus // req.gpus_per_node)
    per_node = min(req.gpus, req.gpus_per_node)
    return {
        "pretrain": {
            "model": model_spec(req.model, req.preset),
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
    g.add_argument("--params", type=float, help=f"a parameter count ({PARAMS_RANGE[0]:.0e} to {PARAMS_RANGE[1]:.0e}, "
                   "e.g. 3e9); shape scaled like Llama, written out as the nearest preset with overrides")
    p.add_argument("--gpus", type=int, required=True, help=f"total GPUs (1 to {MAX_GPUS:,})")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0,
                   help="memory per GPU in GiB (nvidia-smi's MiB / 1024); every memory figure printed is GiB")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (pod), ≥ 1")
    p.add_argument("--seq-len", type=int, default=2048, help=f"sequence length ({SEQ_LEN_MIN} to {MAX_SEQ_LEN:,})")
    p.add_argument("--global-batch", type=int, default=256,
                   help=f"sequences per optimizer step (1 to {MAX_GLOBAL_BATCH:,})")
    p.add_argument("--interconnect", default="ib", choices=sorted(INTERCONNECTS),
                   help="the link between nodes (DP/PP traffic that stays inside a node is timed at NVLink speed)")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help=f"dense peak per GPU, > 0 and ≤ {MAX_PEAK_TFLOPS:g} (bf16: H100 SXM/H200 989, H100 PCIe 756)")
    p.add_argument("--top", type=int, default=5, help="how many ranked layouts to print (≥ 1)")
    p.add_argument("--output", help="write the chosen layout's run-config fragment (YAML) to this file "
                   "(its directory must exist)")


def model_for_params(n: float) -> ModelConfig:
    """A Llama-shaped config with about `n` parameters (dim multiple of 128, 128-dim heads)."""
    check_params(n)
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
    assert best is not None  # n ≥ PARAMS_RANGE[0] gives dim ≥ 256 at 8 layers
    return best[1]


def check_params(n: object) -> None:
    lo, hi = PARAMS_RANGE
    if not (isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) and lo <= n <= hi):
        raise ConfigError(f"--params {_shown(n)}: must be a parameter count from {lo:.0e} to {hi:.0e} "
                          "(smaller models: --model debug or seed)")


def check_output(path: str | None) -> Path | None:
    """`--output`: a file (new or to be replaced) in a directory that exists."""
    if path is None:
        return None
    out = Path(path)
    if not path or path.endswith(("/", os.sep)) or out.is_dir():
        raise ConfigError(f"--output {path!r}: must name a file, not a directory")
    parent = out.parent
    if not parent.is_dir():
        raise ConfigError(f"--output {path!r}: {str(parent)!r} is not an existing directory; create it first")
    return out


def write_atomic(out: Path, text: str) -> None:
    """Write `text` to `out` through the storage layer's atomic local write (a temporary file in the
    same directory, then a rename): `out` is either the whole plan or untouched. OSError becomes a
    StorageError naming the path."""
    from kubellm.core.storage import storage_for

    try:
        storage_for(str(out)).write_bytes(str(out), text.encode())
    except OSError as e:
        raise StorageError(f"--output {str(out)!r}: could not write the plan there: {e.strerror or e}") from e


def main(args: argparse.Namespace) -> int:
    # every flag is checked before any work (Request checks the numbers); nothing is written on failure
    _check_int("--top", args.top, 1)
    out = check_output(args.output)
    cfg = get_preset(args.model) if args.model else model_for_params(args.params)
    req = Request(model=cfg, gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, gpus_per_node=args.gpus_per_node,
                  seq_len=args.seq_len, global_batch=args.global_batch, interconnect=args.interconnect,
                  precision=args.precision, peak_tflops=args.peak_tflops, preset=args.model)
    # the context the estimate assumes; written into the fragment as model.overrides.max_seq_len
    req = dataclasses.replace(req, model=cfg.with_(max_seq_len=max(cfg.max_seq_len, req.seq_len)))
    layouts = plan(req, top=args.top)
    print(f"model: {num_params(req.model) / 1e9:.2f}B parameters ({cfg.n_layers} layers, dim {cfg.dim}, "
          f"{cfg.n_heads} heads / {cfg.kv_heads} kv); {req.gpus} × {req.gpu_mem_gb:g} GiB GPUs")
    for i, lay in enumerate(layouts, 1):
        print(f"{i}. {lay.describe()}")
    fragment = to_fragment(req, layouts[0])
    frag = pytorchjob_shape(fragment) + yaml.safe_dump(fragment, sort_keys=False)
    if out is not None:
        write_atomic(out, frag)
        print(f"wrote {args.output}")
    else:
        print("--- chosen layout (run-config fragment; the PyTorchJob shape in the comment) ---")
        print(frag, end="")
    return 0


if __name__ == "__main__":
    from kubellm.cli import main as cli_main

    sys.exit(cli_main(["plan", *sys.argv[1:]]))
