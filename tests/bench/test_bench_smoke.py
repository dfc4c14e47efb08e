"""Keeps the benchmarks from rotting: two of them run with --quick and produce well-formed rows.
(Benchmarks are not timed here; their numbers are meaningless at --quick sizes.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datasketch")


def test_dedup_and_pipeline_benchmarks_quick(tmp_path: Path) -> None:
    from bench import bench_dedup, bench_pipeline, run_all

    out = tmp_path / "dedup.json"
    assert bench_dedup.main(["--quick", "--json", str(out)]) == 0
    rows = {r["benchmark"]: r for r in json.loads(out.read_text())}
    recall = next(r for k, r in rows.items() if "recall" in k)
    precision = next(r for k, r in rows.items() if "precision" in k)
    # planted near-duplicates (Jaccard ≈ 0.87) are found and nothing else is removed
    assert recall["ours"] >= 0.9 and precision["ours"] >= 0.99
    assert bench_pipeline.main(["--quick", "--json", str(tmp_path / "pp.json")]) == 0
    md = run_all.render([("bench_dedup", run_all.Row(**r)) for r in rows.values()], run_all.machine(), "x", {})
    assert "| near-dedup recall" in md and "Machine:" in md
