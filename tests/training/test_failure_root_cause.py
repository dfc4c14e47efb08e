"""Which rank's error a failed training job reports: the one that failed first (the root cause), not
the first file name in sort order — a peer whose collective broke because the failing rank exited
fails later, and `rank0.txt` sorts before it (and `rank10` before `rank2`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from kubellm.training.job import ERRORS_DIR, JobSpec, failure_message, write_error


def _spec(tmp_path: Path) -> JobSpec:
    return JobSpec(stage="rootcause", config={}, output=str(tmp_path), run_dir=str(tmp_path / "run"))


def test_the_earliest_failure_is_reported_and_the_others_are_named(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    write_error(spec, 0, "Traceback ...\nDistBackendError: connection closed by peer\n", at=1000.5)
    write_error(spec, 2, "Traceback ...\nValueError: shard 7 is corrupt\n", at=1000.1)
    write_error(spec, 10, "Traceback ...\nDistBackendError: timed out\n", at=1001.0)
    msg = failure_message(spec, "pretrain training failed")
    assert msg.startswith("pretrain training failed — rank2 (failed first; also failed after it: rank0, rank10):")
    assert "ValueError: shard 7 is corrupt" in msg and "DistBackendError" not in msg
    assert "failed_at_unix" not in msg  # the header line is the ordering key, not part of the traceback


def test_files_without_a_time_sort_last_and_by_rank_number(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    errors = tmp_path / "run" / ERRORS_DIR
    errors.mkdir(parents=True)
    (errors / "rank10.txt").write_text("error of rank ten\n")
    (errors / "rank2.txt").write_text("error of rank two\n")
    msg = failure_message(spec, "h")
    assert msg.startswith("h — rank2 (failed first; also failed after it: rank10):") and "rank two" in msg
    write_error(spec, 11, "timed error\n", at=5.0)
    assert failure_message(spec, "h").startswith("h — rank11 ")
    (errors / "rank10.txt").write_text("failed_at_unix: not-a-number\nerror of rank ten\n")
    assert failure_message(spec, "h").startswith("h — rank11 ")  # an unreadable time sorts last too


def test_one_failed_rank_is_named_alone(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    write_error(spec, 3, "line\n" * 50 + "the end\n", at=1.0)
    msg = failure_message(spec, "h", lines=5)
    assert msg.splitlines()[0] == "h — rank3:" and msg.splitlines()[-1] == "the end" and len(msg.splitlines()) == 6


# Each worker registers a stage module whose rank 1 fails while rank 0 waits in an all-reduce, then
# runs the real worker entry point (which writes the error files).
_WORKER = textwrap.dedent("""
    import argparse, sys, time, types
    import torch, torch.distributed as dist

    def run_worker(spec):
        dist.init_process_group("gloo")
        dist.barrier()
        if dist.get_rank() == 1:
            time.sleep(0.5)
            raise ValueError("the root cause: rank 1's shard is unreadable")
        dist.all_reduce(torch.ones(1))  # broken when rank 1 exits
        return None

    mod = types.ModuleType("kubellm.rootcause.stage")
    mod.run_worker = run_worker
    sys.modules["kubellm.rootcause"] = types.ModuleType("kubellm.rootcause")
    sys.modules["kubellm.rootcause.stage"] = mod
    from kubellm.training import worker
    sys.exit(worker.main(argparse.Namespace(spec=sys.argv[1])))
""")


def test_a_rank_whose_collective_broke_is_not_reported_as_the_cause(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    uri = spec.write()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, uri], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    files = sorted(p.name for p in (tmp_path / "run" / ERRORS_DIR).iterdir())
    assert files == ["rank0.txt", "rank1.txt"], outs  # both failed: rank 0's collective broke
    msg = failure_message(spec, "rootcause training failed")
    assert msg.startswith("rootcause training failed — rank1 (failed first; also failed after it: rank0):"), msg
    assert "the root cause: rank 1's shard is unreadable" in msg
