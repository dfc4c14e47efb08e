"""AdamW parameter groups and the learning-rate schedule (the one place both are defined).

    groups = param_groups(model, optim_cfg)                 # handed to deepspeed.initialize
    sched = lambda opt: LambdaLR(opt, lr_lambda(optim_cfg, max_steps))   # DeepSpeed calls it
    configured = configured_hyperparameters(scheduler)      # a resume: before the checkpoint loads
    changes = restore_hyperparameters(scheduler, configured)  # after: this run's train.optim applies

Decoupled weight decay (AdamW) is applied to matrices only: norm weights and biases (1-D tensors)
never decay, and embeddings (and a head tied to them) decay only with `optim.decay_embeddings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

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


# what a resume's optimizer/scheduler load overwrites with the checkpoint's values; the config owns them
_HYPERPARAMETERS = ("initial_lr", "betas", "eps", "weight_decay")


class _Scheduler(Protocol):  # torch's LambdaLR, as DeepSpeed builds it over its base optimizer
    optimizer: Any
    base_lrs: list[float]
    lr_lambdas: list[Callable[[int], float]]
    last_epoch: int
    _last_lr: list[float]


def configured_hyperparameters(scheduler: _Scheduler) -> list[dict[str, Any]]:
    """Each param group's configured AdamW hyperparameters (peak lr as `initial_lr`, betas, eps,
    weight decay), taken from the freshly built optimizer before a checkpoint is loaded into it."""
    return [{k: g[k] for k in _HYPERPARAMETERS if k in g} for g in scheduler.optimizer.param_groups]


def restore_hyperparameters(scheduler: _Scheduler, configured: list[dict[str, Any]]) -> list[str]:
    """Put this run's configured hyperparameters back after a same-layout resume, and return what the
    checkpoint had differently (`"lr 0.001 -> 0.002"`; empty when nothing changed).

    Loading a checkpoint restores the optimizer's param groups and the scheduler's base lrs as they
    were saved, so an edited `train.optim.lr`, `weight_decay`, `betas` or `eps` would be silently
    ignored while an edited `warmup_steps`, `min_lr_ratio` or `train.max_steps` (the schedule's
    shape, rebuilt from the config) applied. The config owns all of them: the moments and the
    schedule's position (applied steps) stay the checkpoint's; the next step's lr is the configured
    schedule at that position."""
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(configured):
        raise ValueError(f"the optimizer has {len(groups)} param groups after the load, {len(configured)} before")
    changes: list[str] = []
    for i, (group, want) in enumerate(zip(groups, configured, strict=True)):
        for key, value in want.items():
            have = group.get(key)
            if have is not None and _as_tuple(have) != _as_tuple(value):
                name = "lr" if key == "initial_lr" else key
                change = f"{name} {_fmt(have)} -> {_fmt(value)}"
                if change not in changes:
                    changes.append(change)
            group[key] = value
        scheduler.base_lrs[i] = want.get("initial_lr", scheduler.base_lrs[i])
    scheduler._last_lr = [base * lam(scheduler.last_epoch)
                          for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(groups, scheduler._last_lr, strict=True):
        group["lr"] = lr
    return changes


def _as_tuple(v: Any) -> Any:
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)


def _fmt(v: Any) -> str:
    return "(" + ", ".join(f"{x:g}" for x in _as_tuple(v)) + ")" if isinstance(v, (list, tuple)) else f"{float(v):g}"
