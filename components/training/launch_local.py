"""Run a training `AppDef` on this machine: N processes, gloo on CPU.

    from kubellm.training.launch_local import launch_local
    result = launch_local(appdef)                       # torchrun, output streamed to the console
    result = launch_local(appdef, scheduler="local_cwd")   # the same through TorchX's local scheduler
    result.returncode, result.log_tail

Two equivalent ways, one description: `torchrun` runs the AppDef's command (macros filled in) as a
child process; `local_cwd` hands the AppDef to TorchX's runner. The worker processes find this
checkout's Python first on PATH, so `torchrun` is the virtualenv's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from torchx import specs


@dataclasses.dataclass
class LocalLaunchResult:
    returncode: int
    log_tail: str
    """The last lines the job printed (the failing rank's traceback is usually among them)."""


def _env(role: specs.Role) -> dict[str, str]:
    # A process group this process made for itself (a 1-process stage run earlier in the same
    # Python) must not leak into the job: torchrun sets the workers' own rank variables.
    stale = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KUBELLM_SINGLE_PROCESS_GROUP")
    inherited = {k: v for k, v in os.environ.items()
                 if not (os.environ.get("KUBELLM_SINGLE_PROCESS_GROUP") and k in stale)}
    env = {**inherited, **role.env}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def launch_local(appdef: specs.AppDef, *, scheduler: str = "torchrun", log_dir: str | Path | None = None,
                 tail_lines: int = 60, echo: bool = True) -> LocalLaunchResult:
    """Run `appdef` locally and wait. Never raises on a training failure: the caller turns the
    return code and the workers' error files into a message."""
    if len(appdef.roles) != 1:
        raise ValueError(f"expected a one-role AppDef, got {len(appdef.roles)} roles")
    if scheduler == "local_cwd":
        return _launch_torchx(appdef, log_dir, tail_lines)
    if scheduler != "torchrun":
        raise ValueError(f"unknown local scheduler {scheduler!r}: expected torchrun or local_cwd")
    app_id = f"{appdef.name}-{uuid.uuid4().hex[:8]}"
    role = specs.macros.Values(img_root="", app_id=app_id, replica_id="0",
                               rank0_env="TORCHX_RANK0_HOST").apply(appdef.roles[0])
    return run_process_group([role.entrypoint, *role.args], _env(role), tail_lines,
                             sys.stderr.write if echo else None)


def run_process_group(cmd: list[str], env: dict[str, str], tail_lines: int,
                      echo: Callable[[str], object] | None) -> LocalLaunchResult:
    """Run `cmd` in a session of its own and wait, keeping its last lines. If this process stops
    waiting for any reason — Ctrl-C, SIGTERM, a broken pipe while echoing — the whole session
    (torchrun and every worker) is terminated, then killed: no orphan keeps training and uploading
    into the run dir a retry will use."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    assert proc.stdout is not None
    restore = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        restore = signal.signal(signal.SIGTERM, on_term)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if echo is not None:
                echo(line)
        return LocalLaunchResult(proc.wait(), "\n".join(tail))
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


def _stop_group(proc: subprocess.Popen[str], grace_s: float = 30.0) -> None:
    """SIGTERM the process's group (torchrun forwards it to the workers); after torchrun exits or
    `grace_s` passes, SIGKILL whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _launch_torchx(appdef: specs.AppDef, log_dir: str | Path | None, tail_lines: int) -> LocalLaunchResult:
    from torchx.runner import get_runner

    role = appdef.roles[0]
    role.env = {k: v for k, v in _env(role).items() if k in role.env or k == "PATH"}
    cfg = {"log_dir": str(log_dir)} if log_dir else {}
    with get_runner() as runner:
        handle = runner.run(appdef, scheduler="local_cwd", cfg=cfg)
        status = runner.wait(handle, wait_interval=0.5)
        lines: list[str] = []
        try:
            for stream in (specs.Stream.COMBINED,):
                lines = list(runner.log_lines(handle, role.name, k=0, streams=stream))
        except Exception:  # logs are a convenience; the status decides success
            pass
    ok = status is not None and status.state == specs.AppState.SUCCEEDED
    return LocalLaunchResult(0 if ok else 1, "\n".join(line.rstrip("\n") for line in lines[-tail_lines:]))
