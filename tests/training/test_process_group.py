"""Who is a launcher's worker: the 1-rank group a plain process makes for itself must not make its
child processes (lm_eval, a `kubellm` subprocess, a torchrun launch) take themselves for workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kubellm.training.process_group import in_distributed_worker

_CHILD = textwrap.dedent("""
    from kubellm.training.process_group import in_distributed_worker, init_distributed
    print("worker", in_distributed_worker())
    print("group", *init_distributed("cpu"))
""")

_PARENT = textwrap.dedent(f"""
    import os, subprocess, sys
    from kubellm.training.process_group import in_distributed_worker, init_distributed
    assert init_distributed("cpu") == (0, 1)
    assert not in_distributed_worker()
    assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"]   # DeepSpeed reads these later
    child = subprocess.run([sys.executable, "-c", {_CHILD!r}], capture_output=True, text=True, timeout=120)
    print(child.stdout, end="")
    print(child.stderr[-2000:], file=sys.stderr)
    sys.exit(child.returncode)
""")


def test_child_of_a_self_made_group_makes_its_own() -> None:
    # Before the fix the child inherited RANK/WORLD_SIZE/MASTER_PORT, counted as a worker and tried to
    # bind the parent's store port as rank 0 of a 1-rank job (address in use).
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KUBELLM_SINGLE_PROCESS_GROUP"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _PARENT], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "worker False" in out.stdout
    assert "group 0 1" in out.stdout


@pytest.mark.parametrize(("env", "worker"), [
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, True),                    # torchrun
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500",
      "KUBELLM_SINGLE_PROCESS_GROUP": "1:41234"}, True),        # a launch started under a self-made group
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "41234",
      "KUBELLM_SINGLE_PROCESS_GROUP": "1:41234"}, False),       # a self-made group, inherited
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "5",
      "KUBELLM_SINGLE_PROCESS_GROUP": f"{os.getpid()}:41234"}, False),  # this process's own (env edited since)
    ({"WORLD_SIZE": "2", "MASTER_PORT": "29500"}, False),                                # no RANK
])
def test_in_distributed_worker(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], worker: bool) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "KUBELLM_SINGLE_PROCESS_GROUP"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert in_distributed_worker() is worker


_TWICE = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.dsconfig import deepspeed_config
    from kubellm.training.engine import build_engine
    from kubellm.training.process_group import init_distributed

    def one_step(zero):
        assert init_distributed("cpu") == (0, 1)
        tc = TrainConfig(micro_batch_size=2, global_batch_size=2, seq_len=16, device="cpu", zero_stage=zero)
        torch.manual_seed(0)
        model = Transformer(get_preset("debug").with_(vocab_size=64, max_seq_len=16))
        engine, _ = build_engine(model, tc, deepspeed_config(tc, ParallelConfig(), 1, "cpu"))
        ids = torch.randint(0, 64, (2, 16))
        loss = engine(ids, labels=ids)
        engine.backward(loss)
        engine.step()
        return float(loss)

    zero = int(sys.argv[1])
    first = one_step(zero)
    dist.destroy_process_group()   # torch's own, which leaves DeepSpeed's groups of that world behind
    print("losses", first, one_step(zero))
""")


@pytest.mark.parametrize("zero", [0, 3])
def test_a_new_world_after_torch_destroyed_the_last_trains(zero: int) -> None:
    # Before the fix the second engine met DeepSpeed's cached groups of the destroyed world:
    # "ValueError: Group <...> is not registered".
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KUBELLM_SINGLE_PROCESS_GROUP"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _TWICE, str(zero)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    first, second = (float(x) for x in out.stdout.split("losses")[1].split())
    assert first == second  # the same seeded step on a new world
