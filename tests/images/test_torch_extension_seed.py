"""The training image's prebuilt torch extensions reach the writable TORCH_EXTENSIONS_DIR on a cluster.

Kubernetes `command:` replaces the image ENTRYPOINT, so the copy is made by the training worker
(kubellm.training.worker.seed_torch_extensions) before DeepSpeed loads an op; images/entrypoint.sh
does the same for `docker run`. Both are best-effort: a failed copy never stops the command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kubellm.training import worker

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "images" / "entrypoint.sh"
OLD = 1_600_000_000  # an mtime far in the past, to see that the copy keeps it


def _prebuilt(tmp_path: Path) -> Path:
    src = tmp_path / "prebuilt"
    op = src / "py311_cu128" / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    for name in ("deepspeed_shm_comm.so", "build.ninja", ".ninja_log"):
        (op / name).write_text(name)
        os.utime(op / name, (OLD, OLD))
    return src


def _env(src: Path, dst: Path) -> dict[str, str]:
    return {worker.PREBUILT_EXTENSIONS_ENV: str(src), "TORCH_EXTENSIONS_DIR": str(dst)}


@pytest.mark.parametrize("target", ["missing", "empty"])
def test_seeds_a_missing_or_empty_target_keeping_mtimes(tmp_path: Path, target: str) -> None:
    src = _prebuilt(tmp_path)
    dst = tmp_path / "cache" / "torch_extensions"
    if target == "empty":
        dst.mkdir(parents=True)
    assert worker.seed_torch_extensions(_env(src, dst)) is True
    so = dst / "py311_cu128" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    assert so.read_text() == "deepspeed_shm_comm.so" and so.stat().st_mtime == OLD
    assert os.access(so.parent, os.W_OK)  # torch takes its lock file in there
    assert sorted(p.name for p in dst.parent.iterdir()) == ["torch_extensions"]  # no temp dir left


def test_leaves_a_used_target_alone(tmp_path: Path) -> None:
    src = _prebuilt(tmp_path)
    dst = tmp_path / "torch_extensions"
    (dst / "py311_cu128" / "cpu_adam").mkdir(parents=True)
    assert worker.seed_torch_extensions(_env(src, dst)) is False
    assert [p.name for p in (dst / "py311_cu128").iterdir()] == ["cpu_adam"]


def test_does_nothing_without_a_prebuilt_dir(tmp_path: Path) -> None:
    dst = tmp_path / "torch_extensions"
    assert worker.seed_torch_extensions(_env(tmp_path / "absent", dst)) is False
    assert worker.seed_torch_extensions({"TORCH_EXTENSIONS_DIR": str(dst)}) is False
    assert not dst.exists()


def test_a_failed_copy_warns_and_returns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _prebuilt(tmp_path)
    (tmp_path / "not-a-dir").write_text("")
    assert worker.seed_torch_extensions(_env(src, tmp_path / "not-a-dir" / "torch_extensions")) is False
    assert "could not seed" in capsys.readouterr().err


def test_a_rank_that_loses_the_race_drops_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _prebuilt(tmp_path)
    dst = tmp_path / "torch_extensions"
    real_copytree = shutil.copytree
    raced = []

    def copy_while_another_rank_wins(*args, **kw):  # type: ignore[no-untyped-def]
        if not raced:  # the other local rank finishes first
            raced.append(True)
            real_copytree(src, dst)
            (dst / "winner").write_text("")
        return real_copytree(*args, **kw)

    monkeypatch.setattr(worker.shutil, "copytree", copy_while_another_rank_wins)
    assert worker.seed_torch_extensions(_env(src, dst)) is False
    assert (dst / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prebuilt", "torch_extensions"]


def test_worker_seeds_before_it_reads_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a PyTorchJob pod runs (`torchrun -m kubellm.training.worker`) seeds the cache itself."""
    src = _prebuilt(tmp_path)
    dst = tmp_path / "torch_extensions"
    for key, value in _env(src, dst).items():
        monkeypatch.setenv(key, value)

    class Stop(Exception):
        pass

    def read(_uri: str) -> None:
        assert (dst / "py311_cu128" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()
        raise Stop

    monkeypatch.setattr(worker.JobSpec, "read", staticmethod(read))
    with pytest.raises(Stop):
        worker.main(argparse.Namespace(spec="unused.json"))


def _run_entrypoint(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", "echo ran"], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30)


def test_entrypoint_seeds_and_runs_the_command(tmp_path: Path) -> None:
    src = _prebuilt(tmp_path)
    dst = tmp_path / "torch_extensions"
    done = _run_entrypoint(_env(src, dst))
    assert done.returncode == 0 and done.stdout == "ran\n", done.stderr
    assert (dst / "py311_cu128" / "deepspeed_shm_comm" / "build.ninja").stat().st_mtime == OLD


def test_entrypoint_runs_the_command_when_seeding_fails(tmp_path: Path) -> None:
    src = _prebuilt(tmp_path)
    (tmp_path / "not-a-dir").write_text("")
    done = _run_entrypoint(_env(src, tmp_path / "not-a-dir" / "torch_extensions"))
    assert done.returncode == 0 and done.stdout == "ran\n", done.stderr
    assert "could not seed" in done.stderr


def test_entrypoint_comment_does_not_claim_pods_run_it() -> None:
    text = ENTRYPOINT.read_text()
    assert "run the same copy first" not in text
    assert "kubellm.training.worker" in text
