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
