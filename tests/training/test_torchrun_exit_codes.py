"""kubellm's torchrun wrapper (the PyTorchJob container's main process) exits 128 + the signal when a
worker is killed, so `restartPolicy: ExitCode` restarts the pod instead of failing the job; a Python
error in a worker stays exit 1 (permanent) and success 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def _env() -> dict[str, str]:
    """This environment without a process group's variables (torchrun --standalone sets its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}


def _torchrun(tmp_path: Path, body: str) -> int:
    script = tmp_path / "w.py"
    script.write_text(body)
    return subprocess.run([sys.executable, "-m", "kubellm.training.torchrun", "--standalone", "--nproc-per-node", "1",
                           "--max-restarts", "0", "--monitor-interval", "0.2", str(script)],
                          env=_env(), capture_output=True, timeout=120).returncode


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_exit_codes_tell_a_killed_worker_from_an_error(tmp_path: Path) -> None:
    assert _torchrun(tmp_path, "print('ok')\n") == 0
    assert _torchrun(tmp_path, "raise ValueError('bad config')\n") == 1  # permanent: fail the job
    killed = _torchrun(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert killed == 128 + signal.SIGKILL  # was 1: ExitCode read an OOM-killed worker as a permanent failure


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_a_terminated_torchrun_exits_128_plus_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "w.py"
    script.write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "kubellm.training.torchrun", "--standalone", "--nproc-per-node",
                             "1", "--monitor-interval", "0.2", str(script)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "up" in line:
            break
    proc.send_signal(signal.SIGTERM)  # what the kubelet sends on eviction or preemption
    assert proc.wait(60) == 128 + signal.SIGTERM  # plain torchrun: 1
