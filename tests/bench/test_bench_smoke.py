"""Keeps the benchmarks from rotting: some run with --quick through `bench.run_all` and produce
well-formed rows whose ratios point the right way, and the GPU MFU script's training step (kubellm's
engine) runs and learns on the CPU. Benchmarks are not timed here; their numbers are meaningless at
--quick sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("datasketch")


def test_run_all_quick_writes_rows_whose_ratios_point_the_right_way(tmp_path: Path) -> None:
    from bench import run_all

    out = tmp_path / "B.md"
    assert run_all.main(["--quick", "--only", "bench_dedup", "bench_tokenize", "--output", str(out),
                         "--append-notes", str(tmp_path / "none.md")]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["benchmark"]: r for r in data["rows"]}
    assert not any("benchmark failed" in r["note"] for r in rows.values()), rows
    for name, r in rows.items():
        assert r["ours"] is not None and r["reference"] is not None and math.isfinite(r["ratio"]), name
    dedup = next(r for k, r in rows.items() if k.startswith("near-dedup throughput"))
    tok = next(r for k, r in rows.items() if "ceiling" in k)
    for r in (dedup, tok):  # rates: ours / reference
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"], rel=1e-9)
    recall = next(r for k, r in rows.items() if "recall" in k)
    precision = next(r for k, r in rows.items() if "precision" in k)
    # planted near-duplicates (Jaccard ≈ 0.87) are found and nothing else is removed
    assert recall["ours"] >= 0.9 and precision["ours"] >= 0.99
    assert recall["ratio"] == pytest.approx(recall["ours"] / recall["reference"])
    md = out.read_text()
    assert "A --quick smoke run" in md and "| near-dedup recall" in md and "Machine:" in md


def test_quick_runs_never_overwrite_benchmarks_md(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import run_all

    monkeypatch.setattr(run_all, "REPO", tmp_path)
    monkeypatch.setattr(run_all, "run_one", lambda name, quick, extra: ([], 0.0, name))
    assert run_all.main(["--quick", "--only", "bench_dedup"]) == 0
    assert (tmp_path / ".kubellm" / "bench-quick" / "BENCHMARKS.md").exists()
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_fewer_than_five_repeats_are_refused() -> None:
    from bench import bench_dedup

    with pytest.raises(SystemExit, match="--repeats 2: must be ≥ 5"):
        bench_dedup.main(["--repeats", "2"])


def test_gpu_mfu_step_is_kubellms_training_step_and_learns() -> None:
    """The MFU script times `train()`'s step (DeepSpeed engine, fused LM-head loss); on CPU here, on
    CUDA on a GPU machine. Same batch every step: the loss must fall. In its own process: the engine's
    1-rank group would otherwise stay in this one (RANK/MASTER_* in os.environ, DeepSpeed's cached
    group), and later tests' subprocesses would take themselves for torchrun workers."""
    import subprocess
    import sys

    code = ("import json; from bench import bench_mfu_gpu; "
            "print(json.dumps(bench_mfu_gpu.measure('debug', 2, 32, False, 'cpu', warmup=1, steps=5)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tps, seq, times, losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seq == 32 and len(times) == 5 and tps > 0
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_gpu_mfu_without_cuda_is_a_not_measured_row(tmp_path: Path) -> None:
    import torch

    from bench import bench_mfu_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script measures instead")
    out = tmp_path / "gpu.json"
    assert bench_mfu_gpu.main(["--quick", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["met"] is None and row["ours"] is None and row["ratio"] is None
    assert row["unit"] == "MFU" and row["reference"] == bench_mfu_gpu.TARGET


def test_init_memory_bench_measures_a_shard_below_the_dense_model(tmp_path: Path) -> None:
    """Fresh processes per sample; at `125m` the streamed TP shard's peak is far below building the
    dense model first, and within its one-dense-tensor-at-a-time formula; filled from a safetensors
    export it is far below loading the whole export first."""
    from bench import bench_init_memory

    out = tmp_path / "rows.json"
    assert bench_init_memory.main(["--quick", "--preset", "125m", "--json", str(out)]) == 0
    vs_dense, vs_formula, given = json.loads(out.read_text())
    assert vs_dense["reference"] > 2 * vs_dense["ours"] and vs_dense["met"]
    assert vs_formula["ratio"] == pytest.approx(1.0, abs=0.25)
    # from a base model's safetensors: read tensor by tensor, not the whole model first
    assert given["reference"] > 2 * given["ours"] and given["met"]
