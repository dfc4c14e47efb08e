"""A local launch that stops waiting (Ctrl-C, SIGTERM, a broken pipe while echoing) takes its whole
process group with it: no orphaned torchrun or worker keeps training into the run dir."""

from __future__ import annotations

import os
import sys
import time

import pytest

from kubellm.training.launch_local import run_process_group

# a "torchrun" that starts a worker which ignores SIGTERM, then keeps printing
JOB = """
import signal, subprocess, sys, time
w = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('worker', flush=True); time.sleep(120)"])
print("pid", w.pid, flush=True)
for i in range(600):
    print("step", i, flush=True)
    time.sleep(0.05)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone for our purpose
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_broken_echo_stops_the_whole_group() -> None:
    seen: list[str] = []

    def echo(line: str) -> None:
        seen.append(line)
        if line.startswith("step 3"):
            raise BrokenPipeError("stderr went away")

    start = time.monotonic()
    with pytest.raises(BrokenPipeError):
        run_process_group([sys.executable, "-c", JOB], dict(os.environ), 20, echo)
    worker = int(next(s for s in seen if s.startswith("pid")).split()[1])
    deadline = time.monotonic() + 40
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)  # before: the worker (and torchrun) kept running after the parent gave up
    assert time.monotonic() - start < 60


def test_a_finished_job_returns_its_code_and_tail() -> None:
    r = run_process_group([sys.executable, "-c", "print('a'); print('b'); raise SystemExit(3)"],
                          dict(os.environ), 1, None)
    assert r.returncode == 3 and r.log_tail == "b"
