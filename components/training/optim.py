"""AdamW parameter groups and the learning-rate schedule (the one place both are defined).

    groups = param_groups(model, optim_cfg)                 # handed to deepspeed.initialize
    sched = lambda opt: LambdaLR(opt, lr_lambda(optim_cfg, max_steps))

Decoupled weight decay (AdamW) is applied to matrices only: norm weights and biases (1-D tensors)
never decay, and embeddings (and a head tied to them) decay only with `optim.decay_embeddings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from kubellm.training.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied weight appears once
        is_embedding = id(p) in embedding_ids
        if p.ndim < 2 or (is_embedding and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def schedule_warning(cfg: OptimConfig, max_steps: int) -> str | None:
    """Why the schedule looks unintended, or None: a warm-up longer than the run never reaches the
    peak lr (and never decays). Logged by the engine, not refused: a short trial run of a long
    config can mean it."""
    if cfg.warmup_steps > max_steps:
        reached = max_steps / cfg.warmup_steps
        return (f"train.optim.warmup_steps={cfg.warmup_steps} > train.max_steps={max_steps}: the lr only "
                f"reaches {reached:.0%} of train.optim.lr={cfg.lr:g} and never decays; lower "
                "train.optim.warmup_steps if that is not intended")
    return None


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up from lr/warmup to lr over
    `warmup_steps` (the first step already moves the weights), then cosine decay to
    `min_lr_ratio × lr` at `max_steps`."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
