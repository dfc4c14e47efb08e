"""kubellm plan: every bad flag is a clear error naming the flag and what is allowed, before any work,
with nothing written; --output is written atomically (a write error names the path); memory is
labelled GiB (it is computed in 2**30 bytes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubellm.cli import main as cli_main
from kubellm.model.config import get_preset
from kubellm.training import planner
from kubellm.training.planner import Request, plan

BAD = {
    "gpus-0": (["--model", "7b", "--gpus", "0"], "--gpus 0: must be a whole number from 1 to"),
    "gpus-per-node-0": (["--model", "7b", "--gpus", "8", "--gpus-per-node", "0"], "--gpus-per-node 0: must be"),
    "gpus-per-node-neg": (["--model", "7b", "--gpus", "8", "--gpus-per-node", "-8"], "--gpus-per-node -8: must be"),
    "gpus-not-whole-nodes": (["--model", "7b", "--gpus", "12"], "--gpus 12 is not a multiple of --gpus-per-node 8"),
    "global-batch-0": (["--model", "7b", "--gpus", "8", "--global-batch", "0"], "--global-batch 0: must be"),
    "global-batch-neg": (["--model", "7b", "--gpus", "8", "--global-batch", "-8"], "--global-batch -8: must be"),
    "seq-len-0": (["--model", "7b", "--gpus", "8", "--seq-len", "0"], "--seq-len 0: must be a whole number from 8"),
    "seq-len-neg": (["--model", "7b", "--gpus", "8", "--seq-len", "-5"], "--seq-len -5: must be"),
    "seq-len-7": (["--model", "7b", "--gpus", "8", "--seq-len", "7"], "--seq-len 7: must be"),
    "peak-tflops-neg": (["--model", "7b", "--gpus", "8", "--peak-tflops", "-1"], "--peak-tflops -1: must be a number > 0"),
    "peak-tflops-0": (["--model", "7b", "--gpus", "8", "--peak-tflops", "0"], "--peak-tflops 0: must be"),
    "peak-tflops-nan": (["--model", "7b", "--gpus", "8", "--peak-tflops", "nan"], "--peak-tflops nan: must be"),
    "peak-tflops-inf": (["--model", "7b", "--gpus", "8", "--peak-tflops", "inf"], "--peak-tflops inf: must be"),
    "top-0": (["--model", "7b", "--gpus", "8", "--top", "0"], "--top 0: must be a whole number ≥ 1"),
    "top-neg": (["--model", "7b", "--gpus", "8", "--top", "-1"], "--top -1: must be"),
    "params-1e6": (["--params", "1e6", "--gpus", "8"], "--params 1e+06: must be a parameter count from 5e+07"),
    "params-0": (["--params", "0", "--gpus", "8"], "--params 0: must be"),
    "params-nan": (["--params", "nan", "--gpus", "8"], "--params nan: must be"),
    "params-inf": (["--params", "inf", "--gpus", "8"], "--params inf: must be"),
    "params-neg": (["--params=-1e9", "--gpus", "8"], "--params -1e+09: must be"),
    "gpu-mem-neg": (["--model", "7b", "--gpus", "8", "--gpu-mem-gb", "-1"], "--gpu-mem-gb -1: must be a finite number > 0"),
    "gpu-mem-nan": (["--model", "7b", "--gpus", "8", "--gpu-mem-gb", "nan"], "--gpu-mem-gb nan: must be"),
    "gpu-mem-inf": (["--model", "7b", "--gpus", "8", "--gpu-mem-gb", "inf"], "--gpu-mem-gb inf: must be"),
}


@pytest.mark.parametrize(("args", "message"), BAD.values(), ids=BAD.keys())
def test_bad_flag_is_refused_naming_it_and_nothing_is_written(args: list[str], message: str, tmp_path: Path,
                                                              capsys, monkeypatch) -> None:  # noqa: ANN001
    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("planned before every flag was checked")

    monkeypatch.setattr(planner, "enumerate_layouts", no_work)
    out = tmp_path / "plan.yaml"
    assert cli_main(["plan", *args, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kubellm plan: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_output_path_is_refused_naming_it(tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(planner, "enumerate_layouts", lambda req: pytest.fail("planned before --output was checked"))
    (tmp_path / "afile").write_text("x")
    cases = {
        str(tmp_path / "missing" / "x.yaml"): "is not an existing directory",
        str(tmp_path / "afile" / "x.yaml"): "is not an existing directory",
        str(tmp_path): "must name a file, not a directory",
        str(tmp_path / "newdir") + "/": "must name a file, not a directory",
        "": "must name a file, not a directory",
    }
    for path, message in cases.items():
        assert cli_main(["plan", "--model", "7b", "--gpus", "8", "--output", path]) == 1, path
        err = capsys.readouterr().err
        assert f"--output {path!r}: " in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_output_is_written_atomically(tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    out = tmp_path / "plan.yaml"
    assert cli_main(["plan", "--model", "125m", "--gpus", "8", "--output", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]  # no temporary file left
    before = out.read_text()
    capsys.readouterr()

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    assert cli_main(["plan", "--model", "7b", "--gpus", "8", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--output {str(out)!r}: could not write the plan there: No space left on device" in err, err
    assert out.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_memory_is_labelled_gib(capsys) -> None:  # noqa: ANN001
    assert cli_main(["plan", "--model", "125m", "--gpus", "8", "--gpu-mem-gb", "80", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("; 8 × 80 GiB GPUs")
    assert all(" GiB/GPU (params " in line and " GB/step" in line for line in lines[1:3])
    # 1 GiB = 2**30 bytes: the printed total is the estimate in GiB
    lay = plan(Request(model=get_preset("125m"), gpus=8), top=1)[0]
    assert f"{lay.mem_total_gb:.1f} GiB/GPU" in lines[1]


def test_a_closed_stdout_pipe_ends_quietly() -> None:
    """`kubellm plan ... | head -1`: the reader closing the pipe is not an error to report with a
    traceback; the command stops with the shell's SIGPIPE status."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "kubellm.cli", "plan", "--model", "7b", "--gpus", "64",
                             "--top", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command has printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a closed stdout ends quietly: a command's own pipe or socket breaking is reported."""
    def broken(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe (a child process's stdin)")

    monkeypatch.setattr(planner, "main", broken)
    with pytest.raises(BrokenPipeError, match="child process"):
        cli_main(["plan", "--model", "7b", "--gpus", "8"])
