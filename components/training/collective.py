"""Failing together: a check that can fail on one rank fails on every rank of the job.

    error = None
    try:
        check_my_share()
    except InputDataError as e:
        error = e
    raise_if_any_failed(error, "token shard check", {"InputDataError": InputDataError}, InputDataError)

A rank that raised while its peers went on would leave them waiting in the next collective until its
timeout (10 minutes by default), with nothing in their logs to say why. Collective when
`torch.distributed` is initialized: every rank must call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_if_any_failed(error: BaseException | None, what: str, types: Mapping[str, type[Exception]],
                        default: type[Exception]) -> None:
    """Collective: every rank learns every rank's failure. A rank whose error is the only one raises
    it as it was; every other rank raises `<what> failed on N rank(s): rank r: Type: message; …`, as
    the error class named in `types` when all failures are of that one type, else `default`."""
    msgs = all_gather_objects(None if error is None else (type(error).__name__, str(error)))
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if not failed:
        return
    if error is not None and len(failed) == 1:
        raise error
    kinds = {name for _, (name, _) in failed}
    cls = types.get(kinds.pop(), default) if len(kinds) == 1 else default
    text = "; ".join(f"rank {r}: {name}: {msg}" for r, (name, msg) in failed)
    raise cls(f"{what} failed on {len(failed)} rank(s): {text}") from error
