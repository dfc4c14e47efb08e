"""The per-process training entrypoint that torchrun (locally or in a PyTorchJob pod) starts.

    torchrun --nproc-per-node 2 -m kubellm.training.worker --spec out/runs/r1/job.json
    kubellm launch-worker --spec s3://bucket/kubellm/runs/r1/job.json      # the same, via the CLI

Reads the job spec the launcher wrote (stage, config, inputs, run dir), runs
`kubellm.<stage>.stage.run_worker(spec)` on every rank, and rank 0 writes the stage's manifest to
`run_dir/result.json`. On failure the rank writes its traceback to `run_dir/errors/rank<N>.txt`
(so the launching stage can show it) and exits non-zero.

Before anything loads a DeepSpeed op, each worker seeds the writable $TORCH_EXTENSIONS_DIR with the
ops the training image prebuilt ($KUBELLM_PREBUILT_TORCH_EXTENSIONS, see images/train.Dockerfile).
This happens here, not in the image's ENTRYPOINT: a Kubernetes `command:` (torchrun in PyTorchJob
pods, `sh -c` in KFP pods) replaces the ENTRYPOINT, so a shell entrypoint never runs on a cluster.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Mapping

from kubellm.training.job import JobSpec, write_error, write_result

PREBUILT_EXTENSIONS_ENV = "KUBELLM_PREBUILT_TORCH_EXTENSIONS"


def seed_torch_extensions(environ: Mapping[str, str] | None = None) -> bool:
    """Copy the image's prebuilt torch extensions into $TORCH_EXTENSIONS_DIR; True when copied.

    torch's extension loader takes a lock file inside the extension's directory on every load, so
    the prebuilt ops cannot be used from the read-only image layer; a copy with mtimes kept (ninja
    then finds them up to date and compiles nothing) into the writable cache is cheap. Best-effort:
    nothing happens unless the prebuilt dir exists and the target is missing or empty, and any error
    only prints a warning (the op is then JIT-compiled on first use, as without an image). Several
    local ranks may race here: each copies into a private sibling directory and renames it onto the
    target, which succeeds for one of them (rename onto a non-empty directory fails); the others
    drop their copy.
    """
    env = os.environ if environ is None else environ
    src, dst = env.get(PREBUILT_EXTENSIONS_ENV), env.get("TORCH_EXTENSIONS_DIR")
    if not src or not dst or not os.path.isdir(src):
        return False
    tmp = None
    try:
        if os.path.isdir(dst) and os.listdir(dst):
            return False
        parent = os.path.dirname(os.path.abspath(dst))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".kubellm-seed-", dir=parent)
        shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True)  # copy2: mtimes kept; mode from src
        try:
            os.rename(tmp, dst)
        except OSError:
            if os.path.isdir(dst) and os.listdir(dst):
                return False  # another rank seeded it first
            raise
        tmp = None
        return True
    except OSError as e:
        print(f"kubellm launch-worker: warning: could not seed {dst} from {src} ({e}); "
              "DeepSpeed will compile its ops on first use", file=sys.stderr)
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def configure(p: argparse.ArgumentParser, command: str = "launch-worker") -> None:
    p.add_argument("--spec", required=True, help="job spec JSON written by the launcher (local path or s3://)")


def main(args: argparse.Namespace) -> int:
    seed_torch_extensions()  # before the stage module imports DeepSpeed and loads its ops
    spec = JobSpec.read(args.spec)
    rank = int(os.environ.get("RANK", "0"))
    try:
        module = importlib.import_module(f"kubellm.{spec.stage}.stage")
        manifest = module.run_worker(spec)
        if rank == 0 and manifest is not None:
            write_result(spec, manifest)
    except BaseException as e:
        write_error(spec, rank, traceback.format_exc())
        if isinstance(e, SystemExit | KeyboardInterrupt):
            raise
        print(f"kubellm launch-worker (rank {rank}): error: {e}", file=sys.stderr)
        return 1
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter exits (a local call, no collective): left to
    interpreter teardown, a loaded machine has aborted a finished rank there ("terminate called without
    an active exception", SIGABRT), which the launcher would count as a failed worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kubellm.training.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    sys.exit(main(parser.parse_args()))
