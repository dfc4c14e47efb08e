"""Torn checkpoints end to end: a training process killed after a checkpoint's files reached S3 and
before its manifest was committed resumes from the previous checkpoint, never from the torn one.

    .venv/bin/python -m pytest tests/reliability/test_rel_torn_checkpoint.py -q

Checkpoints every 2 steps with keep=1 on the moto S3 server. The process dies (exit 137) inside the
step-6 save, just before `commit_manifest`. Then: step-6's objects are in the bucket without a
manifest; the step-4 checkpoint is still committed (retention runs only after a commit, so keep=1
did not delete it ahead of a commit that never came); the torn files are overwritten with garbage
(so loading them would fail loudly); a re-run resumes at step 4 and its losses for steps 5–8 equal
an uninterrupted run's bit for bit. The unit-level bookkeeping (latest() skips torn prefixes,
retention order) is in tests/training/test_checkpoint_safety.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from relkit import make_shards, run_with_commit_crash

from kubellm.core.manifest import MANIFEST_NAME
from kubellm.core.storage import join, storage_for
from kubellm.training.spawn import spawn

KW = dict(max_steps=8, checkpoint_every=2, keep_checkpoints=1)


@pytest.mark.integration
def test_crash_between_upload_and_commit_resumes_from_previous(s3_bucket: str, tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    env = {k: os.environ[k] for k in ("KUBELLM_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_REGION")}
    env["KUBELLM_CACHE_DIR"] = str(tmp_path / "cache")
    ref = spawn(run_with_commit_crash, 1, shards, join(s3_bucket, "runs/ref"), None, KW, env=env)[0]

    run = join(s3_bucket, "runs/torn")
    with pytest.raises(RuntimeError, match="137"):
        spawn(run_with_commit_crash, 1, shards, run, 6, KW, env=env)
    st = storage_for(run)
    objects = [o.relpath for o in st.list(join(run, "checkpoints"))]
    torn = [p for p in objects if p.startswith("step-00000006/")]
    assert torn and f"step-00000006/{MANIFEST_NAME}" not in torn  # uploaded, never committed
    assert f"step-00000004/{MANIFEST_NAME}" in objects  # the previous one survived keep=1
    assert not any(p.startswith("step-00000002/") for p in objects)  # retention did run at step 4
    for rel in torn:  # loading any torn file would now fail the sha256 check or the unpickler
        st.write_bytes(join(run, "checkpoints", rel), b"torn")

    resumed = spawn(run_with_commit_crash, 1, shards, run, None, KW, env=env)[0]
    assert resumed["start_step"] == 4
    assert resumed["losses"] == ref["losses"][4:]
    after = [o.relpath for o in st.list(join(run, "checkpoints"))]
    assert after == sorted(p for p in after if p.startswith("step-00000008/"))  # keep=1 after commits


def test_a_zombie_attempt_never_overwrites_a_committed_checkpoint(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod of an earlier attempt still running beside the PyTorchJob's restarted pods (a partitioned
    node) saves the same step after the new attempt committed it, having checked for a manifest just
    before that commit landed. Each save writes under its own `attempt-<id>/` directory, so the zombie's
    upload lands beside the committed files, its commit is refused, and the committed checkpoint still
    verifies and resumes. (In the earlier layout the zombie's upload replaced the committed files, and
    the resume failed their sha256 check.)"""
    import torch

    from kubellm.core.manifest import ManifestConflictError, read_manifest
    from kubellm.core.storage import LocalStorage, sha256_file

    shards = make_shards(tmp_path / "shards")
    run = str(tmp_path / "run")

    def attempt(seed: int, **kw: object) -> Any:
        return _train_here(shards, run, resume=seed == 0, **{"max_steps": 2, "seed": seed, **kw})

    attempt(0)  # the restarted attempt: commits step 2
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    committed = read_manifest(str(step2))
    assert all(f.path.startswith(committed.metadata["files_dir"] + "/") for f in committed.files)

    real_exists = LocalStorage.exists
    # the zombie looked for a manifest before the commit landed: it found none
    monkeypatch.setattr(LocalStorage, "exists", lambda self, uri: False if uri.endswith(MANIFEST_NAME)
                        else real_exists(self, uri))
    with pytest.raises(Exception) as refused:
        attempt(1)  # other weights (seed 1), the same step: other bytes under the same names
    monkeypatch.setattr(LocalStorage, "exists", real_exists)
    assert isinstance(refused.value, ManifestConflictError) or "ManifestConflictError" in str(refused.value)
    dirs = {p.name for p in step2.iterdir() if p.is_dir()}
    assert len(dirs) == 2 and committed.metadata["files_dir"] in dirs  # the zombie's files are beside them
    for f in committed.files:  # every committed file is the one the manifest recorded
        assert sha256_file(step2 / f.path) == f.sha256, f.path
    resumed = attempt(0, max_steps=4)
    assert resumed.start_step == 2 and len(resumed.losses) == 2
    assert all(torch.isfinite(torch.tensor(resumed.losses)))
    # the next commit's retention removed the zombie's files from the checkpoint it kept
    assert {p.name for p in step2.iterdir() if p.is_dir()} == {committed.metadata["files_dir"]}
    for f in committed.files:
        assert sha256_file(step2 / f.path) == f.sha256, f.path


def _train_here(shards: list[str], run: str, resume: bool, **kw: Any) -> Any:
    """One training process, in this one (checkpoints every 2 steps)."""
    from relkit import SEQ, VOCAB, model_config, train_config

    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.training.config import ParallelConfig
    from kubellm.training.engine import train

    obj = PretrainObjective(shards, seq_len=SEQ, vocab_size=VOCAB, prefetch=1)
    return train(model_config(), train_config(**{"checkpoint_every": 2, **kw}), ParallelConfig(dp=1), obj, run,
                 resume=resume)


def test_a_checkpoint_of_the_earlier_layout_still_resumes_exactly(tmp_path: Path) -> None:
    """Checkpoints committed before each save had its own directory (files at the step prefix, no
    `files_dir` in the manifest) resume as before: the same losses as an uninterrupted run."""
    import shutil

    from kubellm.core.manifest import commit_manifest, read_manifest

    shards = make_shards(tmp_path / "shards")
    whole = _train_here(shards, str(tmp_path / "whole"), resume=False, max_steps=4)
    run = tmp_path / "run"
    _train_here(shards, str(run), resume=False, max_steps=4)
    (run / "checkpoints" / "step-00000004" / MANIFEST_NAME).unlink()  # it stopped after committing step 2
    step2 = run / "checkpoints" / "step-00000002"
    new = read_manifest(str(step2))
    files_dir = new.metadata["files_dir"]
    for f in new.files:  # the earlier layout: every file at the step prefix
        (step2 / f.path).rename(step2 / f.path.removeprefix(files_dir + "/"))
    shutil.rmtree(step2 / files_dir)
    (step2 / MANIFEST_NAME).unlink()
    commit_manifest(new.model_copy(update={
        "files": [f.model_copy(update={"path": f.path.removeprefix(files_dir + "/")}) for f in new.files],
        "metadata": {k: v for k, v in new.metadata.items() if k != "files_dir"}}))
    resumed = _train_here(shards, str(run), resume=True, max_steps=4)
    assert resumed.start_step == 2
    assert resumed.losses == whole.losses[2:]
