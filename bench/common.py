"""Shared helpers of the benchmarks: machine description, alternating timing, result rows.

Every benchmark module has `main(argv=None) -> int` with `--quick` (a smoke run) and `--json PATH`
(where `bench.run_all` collects its rows). Ratios are always ours / reference measured in the same
process and the same minutes, alternating ours and reference, so a noisy shared machine moves both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))


@dataclasses.dataclass
class Row:
    """One line of BENCHMARKS.md."""

    benchmark: str
    """What is measured (e.g. `pretrain step tokens/s, debug`)."""
    ours: float | None
    reference: float | None
    unit: str
    ratio: float | None
    """ours / reference (for memory rows: measured / formula)."""
    target: str
    """Human form of the target, e.g. `≥ 1.25×` or `within ±10%`."""
    met: bool | None
    """None = not measured."""
    note: str = ""
    load: float | None = None
    """1-minute load average when the measurement started."""
    samples: int = 0

    def miss(self) -> str:
        if self.met is None:
            return "not measured"
        return "met" if self.met else "missed"


def load_avg() -> float:
    return os.getloadavg()[0]


def at_least(ratio: float, target: float) -> tuple[bool, str]:
    """(met, text) for a `ratio ≥ target` row; the text says by how much it is missed."""
    if ratio >= target:
        return True, ""
    return False, f"missed by {(target - ratio) / target:.1%} (needs {target / ratio:.3f}× more)"


def within(ratio: float, tol: float) -> tuple[bool, str]:
    ok = abs(ratio - 1.0) <= tol
    return ok, "" if ok else f"off by {ratio - 1.0:+.0%} (tolerance ±{tol:.0%})"


def alternate(fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each fn in turn (ours, ref, ours, ref, ...) `warmup` + `repeats` times; each fn returns
    its own measured seconds (or calls `timed`). Returns the post-warm-up samples per name."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = fn()
            if i >= warmup:
                out[name].append(t)
    return out


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, versions — the header of BENCHMARKS.md."""
    cpu = platform.processor() or "?"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for mod in ("torch", "deepspeed", "transformers", "tokenizers", "datasketch", "lm_eval"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 — a missing optional package is just reported
            versions[mod] = "missing"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": mem, "python": platform.python_version(),
            "avx512_bf16": "yes" if "avx512_bf16" in flags else "no", "commit": source_commit(),
            **{k: v for k, v in versions.items()}}


def source_commit() -> str:
    """The commit the benchmarked code is at, `-dirty` when the working tree differs from it (so a
    table can be told apart from code changed since), or `unknown` outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)BENCHMARKS.md", ":(exclude)BENCHMARKS.json"],  # the table itself
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 repeat (numbers meaningless)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after warm-up (default 5)")
    p.add_argument("--json", default=None, help="write the result rows here (bench.run_all uses it)")
    return p


#: the fewest timed repeats a reported median may come from (issue 12: "median of ≥ 5 runs")
MIN_REPEATS = 5


def repeats(args: argparse.Namespace) -> int:
    """Timed repeats after warm-up: `--repeats`, else 5 (1 with --quick, whose numbers are smoke)."""
    if args.repeats is not None:
        least = 1 if args.quick else MIN_REPEATS
        if args.repeats < least:
            raise SystemExit(f"--repeats {args.repeats}: must be ≥ {least} (" + ("a smoke run needs one)" if args.quick
                             else "the median of fewer is noise; --quick allows 1 for smoke runs)"))
        return int(args.repeats)
    return 1 if args.quick else MIN_REPEATS


def emit(rows: list[Row], args: argparse.Namespace) -> int:
    """Print the rows as a small table and write them to --json."""
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.3f}"
        print(f"{r.benchmark}: ours={r.ours} ref={r.reference} {r.unit} ratio={ratio} target {r.target}: "
              f"{r.miss()} {r.note}")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 0


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")
    return int(m.group(1)) * 1024


def reset_peak_rss() -> int:
    """Start the kernel's peak-RSS mark (VmHWM) again from the current RSS, and return that RSS in bytes.
    Not `ru_maxrss`: that also counts the parent's memory a fork-then-exec child started as a copy of."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_rss() -> int:
    """Peak resident bytes of this process since `reset_peak_rss` (or since exec)."""
    return _status_kib("VmHWM")


GIB = 2**30


def memory_reduction_row(name: str, ours: float, reference: float, note: str, load: float, samples: int) -> Row:
    """A host-memory row, peaks in bytes: ours against the reference (ratio = reference / ours, so
    more is better; no issue target)."""
    return Row(name, ours / GIB, reference / GIB, "GiB peak", reference / ours, "> 1× (no issue target)",
               reference / ours > 1.0, f"{note}; ratio = reference / ours", load, samples)


def memory_formula_row(name: str, ours: float, formula: float, note: str, load: float, samples: int) -> Row:
    """A host-memory row, peaks in bytes: ours against what `formula` predicts (within ±10%)."""
    ok, why = within(ours / formula, 0.10)
    return Row(name, ours / GIB, formula / GIB, "GiB peak", ours / formula, "within ±10%", ok,
               f"{note}; {why}".rstrip("; "), load, samples)
