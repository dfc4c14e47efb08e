"""Whole local demo wall time: `kubellm run --local --preset debug` (what `make demo` runs after the
install), on this machine's cores. Measured once (it takes minutes), in a fresh work dir.

    python -m bench.bench_demo
    python -m bench.bench_demo --quick   # only checks the command exists (`--help`)

Target (issue 12): ≤ 10 minutes on 2 cores, install excluded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Row, emit, load_avg, parser

LIMIT_S = 600.0


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    kubellm = str(Path(sys.executable).with_name("kubellm"))
    load = load_avg()
    if args.quick:
        subprocess.run([kubellm, "run", "--help"], check=True, capture_output=True)
        return emit([Row("whole local demo wall time", None, LIMIT_S, "s", None, "≤ 600 s", None,
                         "quick: not run", load, 0)], args)
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-demo-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([kubellm, "run", "--local", "--preset", "debug", "--workdir", tmp],
                              capture_output=True, text=True, env=dict(os.environ), timeout=3 * LIMIT_S)
        dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return emit([Row("whole local demo wall time", dt, LIMIT_S, "s", None, "≤ 600 s", None,
                         f"the demo failed (exit {proc.returncode}): {tail[0][:160]}", load, 1)], args)
    met = dt <= LIMIT_S
    note = "" if met else f"missed by {dt - LIMIT_S:.0f} s ({dt / LIMIT_S - 1:.0%})"
    return emit([Row("whole local demo wall time (kubellm run --local --preset debug)", dt, LIMIT_S, "s",
                     dt / LIMIT_S, "≤ 600 s", met, f"{os.cpu_count()} cores, one run. {note}".strip(), load, 1)], args)


if __name__ == "__main__":
    raise SystemExit(main())
