"""Build DeepSpeed's CPU C++ ops once into $TORCH_EXTENSIONS_DIR.

    python -m kubellm.training.ops --build

DeepSpeed JIT-compiles `deepspeed_shm_comm` (CPU collectives), `fused_adam` and `cpu_adam` (ZeRO
offload) the first time each is used. `make setup` runs this once so tests and local training
processes load the cached .so instead of each paying ~30 s of compilation. The training image does
not run it: it prebuilds only the shared-memory comm op (`images/train.Dockerfile`), since cpu_adam and
the CPU fused_adam compile with -march=native and must be built on the node that runs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from kubellm.training.buildenv import prefer_interpreter_build_tools


def build_cpu_ops(verbose: bool = False) -> list[str]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    prefer_interpreter_build_tools()
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, FusedAdamBuilder, ShareMemCommBuilder

    built = []
    for builder in (ShareMemCommBuilder, FusedAdamBuilder, CPUAdamBuilder):
        t0 = time.perf_counter()
        builder().load(verbose=verbose)
        built.append(f"{builder.__name__} ({time.perf_counter() - t0:.1f}s)")
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="build the CPU ops now")
    args = ap.parse_args(argv)
    if not args.build:
        ap.print_help()
        return 0
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "(torch default: ~/.cache/torch_extensions)")
    for line in build_cpu_ops():
        print(f"deepspeed op ready: {line} in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
