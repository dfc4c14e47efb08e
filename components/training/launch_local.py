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
import dataclasses
import os
import subprocess
import sys
import uuid
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
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen([role.entrypoint, *role.args], env=_env(role), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        if echo:
            sys.stderr.write(line)
    return LocalLaunchResult(proc.wait(), "\n".join(tail))


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
