"""The per-process training entrypoint that torchrun (locally or in a PyTorchJob pod) starts.

    torchrun --nproc-per-node 2 -m kubellm.training.worker --spec out/runs/r1/job.json
    kubellm launch-worker --spec s3://bucket/kubellm/runs/r1/job.json      # the same, via the CLI

Reads the job spec the launcher wrote (stage, config, inputs, run dir), runs
`kubellm.<stage>.stage.run_worker(spec)` on every rank, and rank 0 writes the stage's manifest to
`run_dir/result.json`. On failure the rank writes its traceback to `run_dir/errors/rank<N>.txt`
(so the launching stage can show it) and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from kubellm.training.job import JobSpec, write_error, write_result


def configure(p: argparse.ArgumentParser, command: str = "launch-worker") -> None:
    p.add_argument("--spec", required=True, help="job spec JSON written by the launcher (local path or s3://)")


def main(args: argparse.Namespace) -> int:
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
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kubellm.training.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    sys.exit(main(parser.parse_args()))
