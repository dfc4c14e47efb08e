"""Run a function in N fresh processes that form a gloo process group (CPU), and collect results.

    from kubellm.training.spawn import spawn
    losses_per_rank = spawn(my_fn, 2, arg1, arg2)   # my_fn(*args) runs on ranks 0 and 1

Used by the multi-process integration tests (ZeRO parity, resume) so they share one harness. Each
child gets RANK/WORLD_SIZE/MASTER_* like a torchrun worker (so `kubellm.training.engine.train` joins
the group exactly as it would under torchrun) and one intra-op thread (2 processes on 2 cores; also
keeps CPU reductions identical between the 1- and N-process runs). `fn` must be importable
(module-level) and its arguments and result picklable.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...],
           env: dict[str, str], results: Any) -> None:
    os.environ.pop("KUBELLM_SINGLE_PROCESS_GROUP", None)  # a parent's own 1-rank group, not ours
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **env})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(1)
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, env: dict[str, str] | None = None,
          timeout: float = 600) -> list[Any]:
    """fn(*args) on ranks 0..nprocs-1; returns the results by rank, or raises with the failing
    rank's traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, nprocs, port, args, dict(env or {}), results), daemon=False)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    # read results while the workers run: a result larger than the pipe buffer (~64 KiB) blocks its
    # worker in put() until someone reads it, so joining first would wait on it forever
    deadline = time.monotonic() + timeout
    received = 0
    reader = results._reader  # type: ignore[attr-defined]  # the SimpleQueue's receiving end (has poll)
    while received < nprocs and time.monotonic() < deadline:
        if reader.poll(0.05):
            rank, ok, value = results.get()
            received += 1
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
        elif all(not p.is_alive() for p in procs) and not reader.poll(0):
            break  # every worker is gone and nothing is left to read
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()) if received < nprocs else 30)
        if p.is_alive():
            p.kill()
            p.join()
            errors.append(f"a worker did not finish within {timeout}s (killed)")
    if errors or len(out) != nprocs:
        codes = [p.exitcode for p in procs]
        raise RuntimeError("\n".join(errors) or f"workers exited with codes {codes} and no result")
    return [out[r] for r in range(nprocs)]
