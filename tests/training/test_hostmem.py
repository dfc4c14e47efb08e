"""Host-memory reuse (`kubellm.training.hostmem`): a step that frees and re-allocates its activations
stops faulting fresh pages in, the operator's MALLOC_*_ settings win, and `train.host_memory_reuse`
switches it. Each case runs in its own process: malloc settings last for the life of a process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from kubellm.training.spawn import spawn

_LIBC, _VERSION = platform.libc_ver()
pytestmark = pytest.mark.skipif(_LIBC != "glibc" or tuple(map(int, _VERSION.split(".")[:2])) < (2, 33),
                                reason="mallopt settings are glibc's; the test reads mallinfo2 (glibc ≥ 2.33)")

# In a fresh process: is a 16 MiB block served by mmap (mallinfo2's hblkhd grows) or from the heap;
# then the page faults per "step" of 32 activations of 4 MiB, freed at its end (a training step, to
# malloc), after two warm-up steps.
_STEP = """
import ctypes, json, resource, sys, torch
from kubellm.training.hostmem import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "reuse" else False

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
block = torch.ones(4 << 20)
mmapped = libc.mallinfo2().hblkhd - before
del block

def step():
    acts = [torch.ones(1 << 20) for _ in range(32)]
    del acts

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

step(); step()  # the first steps fault the pages in either way
before = faults()
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "mmapped_mib": mmapped >> 20, "faults_per_step": (faults() - before) / 5}))
"""


def _run(arm: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEP, arm], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reuse_serves_blocks_from_the_heap_and_stops_refaulting_them() -> None:
    default, reuse = _run("default"), _run("reuse")
    assert reuse["applied"] is True and default["applied"] is False
    # glibc's defaults: a fresh process mmaps a 16 MiB block (and munmaps it on free); reuse: heap
    assert default["mmapped_mib"] == 16, default
    assert reuse["mmapped_mib"] == 0, reuse
    # reuse keeps the freed 128 MiB, so later steps fault nothing in. (With the defaults a step
    # faults either all 32,768 pages or none, depending on what else lands at the heap's top: the
    # process-to-process variance the benchmarks saw, so there is no fixed count to assert.)
    pages = 32 * (4 << 20) // 4096
    assert reuse["faults_per_step"] < pages / 50, reuse


def test_operator_malloc_environment_wins() -> None:
    got = _run("reuse", MALLOC_ARENA_MAX="2", MALLOC_TRIM_THRESHOLD_="268435456")
    assert got["applied"] is False
    # the operator's trim threshold froze glibc's mmap threshold at 128 KiB, and it was left there
    assert got["mmapped_mib"] == 16, got


def _engine_applies(reuse: bool) -> bool:
    import torch

    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.training import hostmem
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.dsconfig import deepspeed_config
    from kubellm.training.engine import build_engine
    from kubellm.training.process_group import init_distributed

    init_distributed("cpu")
    tc = TrainConfig(micro_batch_size=2, global_batch_size=2, seq_len=16, device="cpu", host_memory_reuse=reuse)
    torch.manual_seed(0)
    model = Transformer(get_preset("debug").with_(vocab_size=64, max_seq_len=16))
    build_engine(model, tc, deepspeed_config(tc, ParallelConfig(), 1, "cpu"))
    return hostmem._applied


@pytest.mark.parametrize("reuse", [False, True])
def test_train_host_memory_reuse_switches_it_in_build_engine(reuse: bool) -> None:
    assert spawn(_engine_applies, 1, reuse) == [reuse]
