"""Host-memory reuse (`kubellm.training.hostmem`): a step that frees and re-allocates its activations
stops faulting fresh pages in, the operator's MALLOC_*_ settings win, and `train.host_memory_reuse`
switches it. Each case runs in its own process: malloc settings last for the life of a process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from kubellm.training.spawn import spawn

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

# 32 activations of 4 MiB per "step", freed at its end: the shape of a training step to malloc. With
# glibc's defaults the heap is trimmed after every step (128 MiB free at its top, over twice the
# largest block), so each step faults all 32,768 pages in again.
_STEP = """
import json, resource, sys, torch
from kubellm.training.hostmem import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "reuse" else False

def step():
    acts = [torch.ones(1 << 20) for _ in range(32)]
    del acts

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

step(); step()  # warm-up: the first steps fault the pages in either way
before = faults()
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "faults_per_step": (faults() - before) / 5}))
"""


def _run(arm: str, **env: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", _STEP, arm], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reuse_stops_each_step_faulting_its_activations_back_in() -> None:
    default, reuse = _run("default"), _run("reuse")
    assert reuse["applied"] is True
    pages = 32 * (4 << 20) // 4096  # the step's activations, in 4 KiB pages
    # glibc's defaults hand the freed 128 MiB back to the kernel and fault it in again every step
    assert default["faults_per_step"] > pages / 2, default
    assert reuse["faults_per_step"] < pages / 50, reuse


def test_operator_malloc_environment_wins() -> None:
    got = _run("reuse", MALLOC_ARENA_MAX="2", MALLOC_TRIM_THRESHOLD_="268435456")
    assert got["applied"] is False


def _engine_applies(reuse: bool) -> bool:
    import torch

    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.training import hostmem
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.dsconfig import deepspeed_config
    from kubellm.training.engine import build_engine, init_distributed

    init_distributed("cpu")
    tc = TrainConfig(micro_batch_size=2, global_batch_size=2, seq_len=16, device="cpu", host_memory_reuse=reuse)
    torch.manual_seed(0)
    model = Transformer(get_preset("debug").with_(vocab_size=64, max_seq_len=16))
    build_engine(model, tc, deepspeed_config(tc, ParallelConfig(), 1, "cpu"))
    return hostmem._applied


@pytest.mark.parametrize("reuse", [False, True])
def test_train_host_memory_reuse_switches_it_in_build_engine(reuse: bool) -> None:
    assert spawn(_engine_applies, 1, reuse) == [reuse]
