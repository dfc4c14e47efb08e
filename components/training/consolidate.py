"""The whole model's weights in fp32 on the host, from a DeepSpeed engine at any ZeRO stage: what the
stages export (`consolidated_state_dict`, rank 0) and what a relayout or a pipeline stage gathers
(`fp32_state_dict`). Collective over the data-parallel group, one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.distributed as dist


def full_fp32_param(p: torch.nn.Parameter, keep: bool = True) -> torch.Tensor | None:
    """Collective over the data-parallel group: the whole of `p` as an fp32 CPU tensor (None where
    `keep` is False), from DeepSpeed's fp32 master copy where it keeps one (ZeRO 1/2/3, bf16/fp16); a
    frozen ZeRO-3 parameter is gathered, one parameter at a time."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p) if p.requires_grad else None
    if value is None and hasattr(p, "ds_id"):  # ZeRO-3 frozen parameter
        with GatheredParameters([p], modifier_rank=None):
            value = p.detach().clone() if keep else None
    elif value is None:
        value = p.detach()
    return value.detach().to("cpu", torch.float32).clone() if keep and value is not None else None


def fp32_state_dict(module: torch.nn.Module, keep: bool = True, only: Callable[[str], bool] | None = None
                    ) -> dict[str, torch.Tensor] | None:
    """Collective over the data-parallel group: `module`'s state dict on the host in fp32, parameters
    from DeepSpeed's master copy (`full_fp32_param`, one at a time), buffers copied; None where `keep`
    is False (that rank still takes part in every gather). `only`: the state-dict names to return (a
    parameter is gathered when one of its names is selected; every rank must select the same)."""
    entries = module.state_dict(keep_vars=True)
    selected = {n for n in entries if only is None or only(n)}
    wanted = {id(t) for n, t in entries.items() if n in selected}
    full: dict[int, torch.Tensor] = {}
    for _, p in module.named_parameters():  # same order on every rank: the calls are collective
        if id(p) not in wanted:
            continue
        value = full_fp32_param(p, keep=keep)
        if value is not None:
            full[id(p)] = value
    if not keep:
        return None
    out: dict[str, torch.Tensor] = {}
    for name, t in entries.items():
        if name not in selected:
            continue
        if id(t) in full:
            out[name] = full[id(t)]
        else:  # buffers: never partitioned by ZeRO
            out[name] = t.detach().to("cpu").clone()
            if out[name].is_floating_point():
                out[name] = out[name].float()
    return out


def consolidated_state_dict(engine: Any, names: Collection[str] | None = None) -> dict[str, torch.Tensor] | None:
    """Collective: the full fp32 model state_dict on CPU on rank 0 (None elsewhere), for any ZeRO
    stage, or its entries in `names`. Uses the fp32 master weights where DeepSpeed keeps them (ZeRO
    1/2/3, bf16/fp16), so a bf16 run exports its optimizer's precision, not the rounded module weights."""
    keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    return fp32_state_dict(engine.module, keep=keep, only=None if names is None else set(names).__contains__)
