"""The process group every training worker joins: gloo on CPU, NCCL on CUDA, through DeepSpeed.

    rank, world = init_distributed(resolve_device(train_cfg.device))

Under torchrun or a PyTorchJob the launcher's RANK / WORLD_SIZE / MASTER_* are joined; a plain `python`
process gets a 1-rank group of its own, so the same DeepSpeed path runs everywhere. Collectives time out
after `pg_timeout()` instead of hanging on a lost peer.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from kubellm.core.errors import ConfigError


def resolve_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_SELF_MADE = "KUBELLM_SINGLE_PROCESS_GROUP"


def in_distributed_worker() -> bool:
    """True inside a torchrun / PyTorchJob worker (the launcher set RANK and WORLD_SIZE)."""
    # init_distributed gives a plain `python` process a 1-rank group and marks it `<pid>:<port>`.
    # Those variables stay in os.environ (DeepSpeed reads LOCAL_RANK while it builds engines), so child
    # processes inherit them: in the process that made the group, or in a child while MASTER_PORT is
    # still that port, they describe that group, not a launcher's (a launcher sets a port of its own).
    pid, _, port = os.environ.get(_SELF_MADE, "").partition(":")
    self_made = bool(port) and (pid == str(os.getpid()) or port == os.environ.get("MASTER_PORT"))
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not self_made


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world_size)."""
    if not dist.is_initialized():
        if not in_distributed_worker():
            # a plain `python` process: a 1-rank group so the same DeepSpeed path runs everywhere
            port = str(_free_port())
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", _SELF_MADE: f"{os.getpid()}:{port}",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        import deepspeed
        from deepspeed.utils import groups

        # a world this process had before, destroyed with torch's own `destroy_process_group` (not
        # deepspeed.comm's), leaves DeepSpeed holding the groups it built from it: the next engine would
        # meet them dead ("Group ... is not registered"); a new world starts without them
        groups._release_process_group_references(group=None)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", timeout=pg_timeout())
    return dist.get_rank(), dist.get_world_size()


def pg_timeout() -> datetime.timedelta:
    """The process-group timeout: KUBELLM_PG_TIMEOUT_S (the PyTorchJob's `pg_timeout_s`), else 600 s. A
    collective waiting on a lost peer fails after it instead of hanging the other ranks."""
    raw = os.environ.get("KUBELLM_PG_TIMEOUT_S", "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"KUBELLM_PG_TIMEOUT_S={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"KUBELLM_PG_TIMEOUT_S={raw!r}: expected a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)
