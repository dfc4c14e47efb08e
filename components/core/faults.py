"""Fault injection for the reliability tests: environment-driven hooks at fixed points of a run.

    KUBELLM_FAULT_KILL_AT_STEP=6:1 torchrun --nproc-per-node 2 --max-restarts 1 -m kubellm.training.worker ...

`KUBELLM_FAULT_KILL_AT_STEP="<step>:<rank>[,<step>:<rank>…]"` makes rank `<rank>` (or every rank with
`*`) exit at once with code 137 — what a SIGKILL / OOM-kill of the pod looks like to torchrun and to
the Training Operator — just before it runs optimizer step `<step>` (1-based, the numbering of
metrics.jsonl and of the checkpoints). `os._exit` skips every `finally`, atexit hook and flush, like
a real kill. The fault fires on the first attempt only (`TORCHELASTIC_RESTART_COUNT` unset or 0), so
a torchrun `--max-restarts` restart resumes past it instead of dying again at the same step.

Nothing here is active unless the variable is set; the engine calls `maybe_kill` once per step.
"""

from __future__ import annotations

import os
import sys

from kubellm.core.errors import ConfigError

KILL_ENV = "KUBELLM_FAULT_KILL_AT_STEP"
KILL_EXIT_CODE = 137  # 128 + SIGKILL: the exit status a killed container reports


def parse_kill_spec(text: str) -> list[tuple[int, int | None]]:
    """`"6:1,9:*"` -> [(6, 1), (9, None)] (None = every rank); ConfigError naming the bad entry."""
    out: list[tuple[int, int | None]] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        step, sep, rank = item.partition(":")
        try:
            if not sep or int(step) < 1:
                raise ValueError
            out.append((int(step), None if rank.strip() == "*" else int(rank)))
        except ValueError:
            raise ConfigError(f"{KILL_ENV}={text!r}: bad entry {item!r}; expected <step>:<rank> with "
                              "step ≥ 1 and rank an integer or '*'") from None
    return out


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def maybe_kill(step: int, rank: int) -> None:
    """Exit with 137 if `KUBELLM_FAULT_KILL_AT_STEP` names this (step, rank) on the first attempt."""
    spec = os.environ.get(KILL_ENV)
    if not spec or restart_count() > 0:
        return
    for s, r in parse_kill_spec(spec):
        if s == step and r in (None, rank):
            print(f"kubellm fault injection: rank {rank} killed before step {step} ({KILL_ENV})",
                  file=sys.stderr, flush=True)
            os._exit(KILL_EXIT_CODE)
