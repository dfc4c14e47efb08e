"""Changing layout: a checkpoint saved with TP=2 resumes in 1 process, and a 1-process checkpoint
resumes with PP=2, with the same next-step loss as the uninterrupted 1-process run.

The weights, step, data position and LR-schedule position carry over (kubellm.training.relayout);
AdamW's moments restart, so only the first resumed step is compared exactly (1e-5 relative) and
the later ones within 2e-2. Each "interrupted" run is a full run whose last checkpoint's manifest is
removed, i.e. a run that stopped after committing step 6.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubellm.core.manifest import MANIFEST_NAME
from kubellm.training.spawn import spawn
from tests.parallel.parallel_helpers import run_training

TOTAL, STOP = 8, 6
CKPT = {"checkpoint_every": STOP, "keep_checkpoints": 2}


def _stop_after_step6(run_dir: Path) -> None:
    (run_dir / "checkpoints" / f"step-{TOTAL:08d}" / MANIFEST_NAME).unlink()


def _run(world: int, shards: list[str], run_dir: Path, layout: dict[str, int], resume: bool) -> list[dict[str, Any]]:
    return spawn(run_training, world, shards, str(run_dir), layout, 1, 2, 8, TOTAL, None, CKPT, resume, False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from tests.parallel.parallel_helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("rshards"))


@pytest.fixture(scope="module")
def one_process_run(shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    run_dir = tmp_path_factory.mktemp("ref1")
    return run_dir, _run(1, shards, run_dir, {"dp": 1}, False)[0]["losses"]


def _check_resumed(resumed: dict[str, Any], reference: list[float]) -> None:
    assert resumed["start_step"] == STOP
    assert len(resumed["losses"]) == TOTAL - STOP
    np.testing.assert_allclose(resumed["losses"][0], reference[STOP], rtol=1e-5)  # weights + data position
    np.testing.assert_allclose(resumed["losses"], reference[STOP:], rtol=2e-2)  # optimizer restarted


@pytest.mark.integration
def test_tp2_checkpoint_resumes_in_one_process(shards: list[str], one_process_run: tuple[Path, list[float]],
                                               tmp_path: Path) -> None:
    _, reference = one_process_run
    tp_run = _run(2, shards, tmp_path, {"tp": 2}, False)
    np.testing.assert_allclose(tp_run[0]["losses"], reference, rtol=1e-5)
    from kubellm.training.checkpoint import CheckpointManager

    latest = CheckpointManager(str(tmp_path / "checkpoints")).latest()
    assert latest is not None and latest.metadata["layout"]["tp"] == 2  # the manifest records the layout
    _stop_after_step6(tmp_path)
    resumed = _run(1, shards, tmp_path, {"dp": 1}, True)[0]
    _check_resumed(resumed, reference)


@pytest.mark.integration
def test_one_process_checkpoint_resumes_with_pp2(shards: list[str], one_process_run: tuple[Path, list[float]],
                                                 tmp_path: Path) -> None:
    src, reference = one_process_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    _stop_after_step6(run_dir)
    ranks = _run(2, shards, run_dir, {"pp": 2}, True)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    _check_resumed(ranks[0], reference)
    from kubellm.training.checkpoint import CheckpointManager

    latest = CheckpointManager(str(run_dir / "checkpoints")).latest()
    assert latest is not None and latest.metadata["layout"]["pp"] == 2 and latest.metadata["layout"]["tp"] == 1


@pytest.mark.integration
def test_pp2_checkpoint_resumes_exactly_with_pp2(shards: list[str], one_process_run: tuple[Path, list[float]],
                                                 tmp_path: Path) -> None:
    """Same layout: DeepSpeed's own per-stage files (optimizer state included) through the
    CheckpointManager, so every resumed step matches the uninterrupted run."""
    _, reference = one_process_run
    first = _run(2, shards, tmp_path, {"pp": 2}, False)
    np.testing.assert_allclose(first[0]["losses"], reference, rtol=1e-5)
    _stop_after_step6(tmp_path)
    resumed = _run(2, shards, tmp_path, {"pp": 2}, True)[0]
    assert resumed["start_step"] == STOP
    np.testing.assert_allclose(resumed["losses"], reference[STOP:], rtol=1e-5)
    # the pp=2 manifest records the model config itself (a pipeline stage module carries none), so a
    # resume with another model is refused naming what differs, before any stage loads its files
    from kubellm.training.checkpoint import CheckpointManager

    latest = CheckpointManager(str(tmp_path / "checkpoints")).latest()
    assert latest is not None and latest.metadata["model_config"]["n_layers"] == 4
    with pytest.raises(RuntimeError, match=r"checkpoint is from a different model: model config differs — "
                                           r"n_layers: checkpoint=4, this run=6"):
        spawn(run_training, 2, shards, str(tmp_path), {"pp": 2}, 1, 2, 8, TOTAL, {"n_layers": 6}, CKPT, True, False)


def test_a_new_layout_with_another_model_config_is_refused(one_process_run: tuple[Path, list[float]],
                                                           tmp_path: Path) -> None:
    """Changing tp/pp together with, say, rope_theta had resumed the old weights under the new config:
    the same-layout resume refuses that, and so does the relayout path now."""
    from kubellm.training.checkpoint import CheckpointMismatchError
    from kubellm.training.config import ParallelConfig
    from kubellm.training.relayout import consolidated_resume
    from tests.parallel.parallel_helpers import tiny_model

    run_dir = tmp_path / "run"
    shutil.copytree(one_process_run[0], run_dir)
    with pytest.raises(CheckpointMismatchError, match=r"different model: model config differs — rope_theta: "):
        consolidated_resume(str(run_dir), tiny_model(rope_theta=5000.0), ParallelConfig(dp=1, pp=2))
    assert consolidated_resume(str(run_dir), tiny_model(), ParallelConfig(dp=1, pp=2)) is not None


def test_the_consolidated_weights_are_unsharded_as_they_are_read(one_process_run: tuple[Path, list[float]],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """A relayout reads the checkpoint's shards memory-mapped and un-shards one dense tensor per lookup, as
    the new layout's model is filled: no rank builds the dense state dict (its staging copy is gone by then)."""
    import torch

    from kubellm.training import relayout as relayout_module
    from kubellm.training.checkpoint import CheckpointManager
    from kubellm.training.checkpoint_engine import safe_torch_load
    from kubellm.training.config import ParallelConfig
    from tests.parallel.parallel_helpers import tiny_model

    run_dir = tmp_path / "run"
    shutil.copytree(one_process_run[0], run_dir)
    calls: list[str] = []
    real = relayout_module.unshard_tensor

    def counted(name: str, parts: list[torch.Tensor], cfg: Any) -> torch.Tensor:
        calls.append(name)
        return real(name, parts, cfg)

    monkeypatch.setattr(relayout_module, "unshard_tensor", counted)
    got = relayout_module.consolidated_resume(str(run_dir), tiny_model(), ParallelConfig(dp=1, pp=2))
    assert got is not None and calls == []
    weights = dict(got.state_dict)
    assert len(calls) == len(weights)
    latest = CheckpointManager(str(run_dir / "checkpoints")).latest()
    assert latest is not None and latest.metadata["step"] == TOTAL
    (module_file,) = (run_dir / "checkpoints" / f"step-{TOTAL:08d}").rglob("mp_rank_00_model_states.pt")
    saved = safe_torch_load(module_file, map_location="cpu")["module"]
    assert set(weights) == set(saved)
    for k, v in saved.items():
        assert torch.equal(weights[k], v.float()), k
