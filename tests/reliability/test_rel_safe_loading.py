"""Safe loading end to end: a committed checkpoint whose file was replaced by a pickle that runs code
— with a manifest re-committed to match it, as an attacker with write access to the bucket could —
is refused by a resuming run, and the code never runs.

    .venv/bin/python -m pytest tests/reliability/test_rel_safe_loading.py -q

The unit case (SafeTorchCheckpointEngine refusing the same payload) is in
tests/training/test_checkpoint_safety.py; the AST scan that keeps `pickle.load`, `torch.load`
without `weights_only=True` and `trust_remote_code=True` out of the package is tests/test_source_scan.py
(part of the default suite, so it runs in CI).
"""

from __future__ import annotations

import builtins
import hashlib
from pathlib import Path

import pytest
import torch
from relkit import make_shards, run_resume_only

from kubellm.core.manifest import MANIFEST_NAME, FileEntry, commit_manifest, read_manifest
from kubellm.training.spawn import spawn


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a crafted checkpoint does with weights_only=False
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.integration
def test_crafted_committed_checkpoint_never_runs_code(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    run = tmp_path / "run"
    first = spawn(run_resume_only, 1, shards, str(run), {"max_steps": 2, "checkpoint_every": 2})[0]
    assert first.get("start_step") == 0, first
    (target,) = (run / "checkpoints" / "step-00000002").rglob("mp_rank_00_model_states.pt")
    marker = tmp_path / "pwned"
    _craft(target, marker)

    resumed = spawn(run_resume_only, 1, shards, str(run), {"max_steps": 4, "checkpoint_every": 2})[0]
    assert "error" in resumed, resumed
    assert "exec" in resumed["error"] and target.name in resumed["error"], resumed["error"]
    assert not marker.exists()  # the payload never ran


def _craft(target: Path, marker: Path) -> None:
    """Replace a committed checkpoint file by a pickle that runs code, and re-commit its manifest to
    match (sha256 and size), so only safe loading stands in the way."""
    original = torch.load(target, weights_only=False)  # noqa: S614 - our own file, to keep its shape
    torch.save({**original, "payload": _Exploit(marker)}, target)
    ckpt = next(d for d in target.parents if (d / MANIFEST_NAME).exists())  # the step prefix
    manifest = read_manifest(str(ckpt))
    data = target.read_bytes()
    rel = target.relative_to(ckpt).as_posix()  # under the save's own attempt-<id>/ directory
    files = [FileEntry(path=f.path, size=len(data), sha256=hashlib.sha256(data).hexdigest())
             if f.path == rel else f for f in manifest.files]
    (ckpt / MANIFEST_NAME).unlink()
    commit_manifest(manifest.model_copy(update={"files": files}))


@pytest.mark.integration
@pytest.mark.parametrize("zero", [1, 3])
def test_a_crafted_shard_of_one_rank_fails_every_rank(zero: int, tmp_path: Path) -> None:
    """2 ranks: only rank 1 reads the crafted optimizer shard. Its refusal reaches rank 0 through the
    load's failure exchange, before DeepSpeed's load (whose ZeRO-3 path ends in a collective rank 1
    would never join): rank 0 would otherwise wait until the process-group timeout."""
    shards = make_shards(tmp_path / "shards")
    run = tmp_path / "run"
    kw = {"max_steps": 2, "checkpoint_every": 2, "zero_stage": zero}
    first = spawn(run_resume_only, 2, shards, str(run), kw, None)
    assert all(r.get("start_step") == 0 for r in first), first
    (target,) = (run / "checkpoints" / "step-00000002").rglob("zero_pp_rank_1_mp_rank_00_optim_states.pt")
    marker = tmp_path / "pwned"
    _craft(target, marker)
    r0, r1 = spawn(run_resume_only, 2, shards, str(run), {**kw, "max_steps": 4}, None, timeout=300)
    assert "exec" in r1.get("error", "") and target.name in r1["error"], r1
    assert r0.get("error", "").startswith("CheckpointError: checkpoint load "), r0
    assert "failed on 1 rank(s): rank 1: UnsafeCheckpointError" in r0["error"] and target.name in r0["error"], r0
    assert not marker.exists()  # the payload never ran
