"""Gradient norms and clipping for every layout the engine trains.

Which side computes the norm (`deepspeed_checks_step`): DeepSpeed's own optimizer wrappers (ZeRO ≥ 1, its
bf16/fp16 modes on CUDA) inside `step()`, read afterwards with `deepspeed_grad_norm`; otherwise (ZeRO 0) kubellm,
before the update: `clip_gradients` for a dense model, `clip_model_parallel` with TP and/or PP (one
global norm over every rank, `model_parallel_grad_norm`). The norm feeds the step guard and the metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from kubellm.model.parallel import collective_device


def deepspeed_grad_norm(engine: Any) -> float:
    """Global gradient norm before clipping, as DeepSpeed's optimizer recorded it in the last `step()`
    (ZeRO ≥ 1, bf16/fp16 wrappers: `deepspeed_checks_step`); where it records none, a norm of this
    rank's .grad tensors (plain ZeRO 0 uses `clip_gradients` / `model_parallel_grad_norm` instead)."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def model_parallel_grad_norm(engine: Any, tp_rank: int, dp_size: int) -> float:
    """ZeRO 0 with TP and/or PP: the global norm of the (already data-parallel-reduced) gradients,
    the same number on every rank. Each rank sums the squares of its own gradients, counting a
    TP-sharded parameter (`tensor_model_parallel`) on every TP rank, a replicated one (norms) on TP
    rank 0 only, and a pipeline-tied copy (`ds_pipe_replicated`, the embedding on the last stage)
    not at all; one all-reduce over every rank then adds the stages, TP ranks and the dp replicas
    (which hold identical gradients, hence the division by dp)."""
    sq = torch.zeros(1, dtype=torch.float64, device=collective_device())
    for p in engine.module.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if tp_rank != 0 and not getattr(p, "tensor_model_parallel", False):
            continue
        sq += torch.linalg.vector_norm(p.grad.detach().float()).double() ** 2
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return math.sqrt(float(sq[0]) / dp_size)


def deepspeed_checks_step(engine: Any, zero_stage: int) -> bool:
    """Whether DeepSpeed's own optimizer wrapper computes the gradient norm and skips a non-finite
    step inside `step()`: ZeRO ≥ 1, and DeepSpeed's bf16/fp16 modes (CUDA). The norm is then read
    after `step()` (before it, `get_global_grad_norm` still holds the previous step's value)."""
    return zero_stage > 0 or bool(engine.bfloat16_enabled()) or bool(engine.fp16_enabled())


def clip_model_parallel(engine: Any, tp_rank: int, dp_size: int, max_norm: float) -> float:
    """ZeRO 0 with TP and/or PP: the global gradient norm over every rank (`model_parallel_grad_norm`,
    returned before clipping), and this rank's .grad clipped by it with torch's `clip_grads_with_norm_`
    (the factor `clip_grad_norm_` applies, the same on every rank). No clipping when `max_norm` ≤ 0 or
    the norm is not finite (the step guard skips that step)."""
    norm = model_parallel_grad_norm(engine, tp_rank, dp_size)
    if max_norm <= 0 or not math.isfinite(norm):
        return norm
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm, dtype=torch.float64), foreach=True)
    return norm


def clip_gradients(engine: Any, max_norm: float) -> float:
    """Global gradient norm of the module's .grad (before clipping), clipped to `max_norm` when > 0:
    torch's foreach kernels, one norm for both the clip and the logged value. Used where
    `dsconfig.clips_in_kubellm` holds without TP/PP (DeepSpeed's gradient_clipping is 0 there)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))
