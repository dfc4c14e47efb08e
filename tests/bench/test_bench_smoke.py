"""Keeps the benchmarks from rotting: two of them run with --quick and produce well-formed rows.
(Benchmarks are not timed here; their numbers are meaningless at --quick sizes.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datasketch")


def test_dedup_and_gpu_benchmarks_quick(tmp_path: Path) -> None:
    from bench import bench_dedup, bench_mfu_gpu, run_all

    out = tmp_path / "dedup.json"
    assert bench_dedup.main(["--quick", "--json", str(out)]) == 0
    rows = {r["benchmark"]: r for r in json.loads(out.read_text())}
    recall = next(r for k, r in rows.items() if "recall" in k)
    precision = next(r for k, r in rows.items() if "precision" in k)
    # planted near-duplicates (Jaccard ≈ 0.87) are found and nothing else is removed
    assert recall["ours"] >= 0.9 and precision["ours"] >= 0.99
    gpu = tmp_path / "gpu.json"
    assert bench_mfu_gpu.main(["--quick", "--json", str(gpu)]) == 0  # no CUDA here: a "not measured" row
    (row,) = json.loads(gpu.read_text())
    assert row["met"] is None or row["ours"] is not None
    md = run_all.render([("bench_dedup", run_all.Row(**r)) for r in rows.values()], run_all.machine(), "x", {})
    assert "| near-dedup recall" in md and "Machine:" in md
