"""Pipeline bubble, pp = 2, micro-batches 4/8/16, against (p−1)/(m+p−1).

    python -m bench.bench_pipeline

Measured only once pipeline parallelism (`components/training/pipeline.py`) is committed on main and
the engine accepts parallel.pp > 1; until then it writes a "not measured" row saying why.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.common import Row, emit, load_avg, parser

REPO = Path(__file__).resolve().parents[1]


def pp_on_main() -> tuple[bool, str]:
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "components/training/pipeline.py"], cwd=REPO,
                             capture_output=True, text=True).returncode == 0
    if not tracked:
        return False, "not measured: PP not on main (components/training/pipeline.py is not committed)"
    from kubellm.core.errors import ConfigError
    from kubellm.training.config import ParallelConfig, TrainConfig
    from kubellm.training.dsconfig import deepspeed_config

    try:
        deepspeed_config(TrainConfig(micro_batch_size=1, global_batch_size=4), ParallelConfig(pp=2), 2, "cpu")
    except ConfigError as e:
        return False, f"not measured: the engine refuses pp=2 ({str(e)[:120]})"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    ok, why = pp_on_main()
    rows = []
    for m in (4, 8, 16):
        ideal = 1 / (m + 1)
        # TODO(perf): per-stage timestamps from the PipelineEngine once PP lands (ok is True)
        note = why or "PP is on main but the timestamped measurement is not written yet"
        rows.append(Row(f"pipeline bubble, pp=2, m={m}", None, ideal, "fraction", None, "within ±15%", None,
                        note, load_avg(), 0))
    return emit(rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
