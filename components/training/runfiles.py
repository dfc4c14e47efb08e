"""Where a training run keeps its files besides the checkpoints: rank 0's metrics (JSONL, TensorBoard)
in a node-local work dir, copied to an S3 run dir at every checkpoint and fetched back before a resume on
another pod; and the scratch directories the stages build their outputs in.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kubellm.core.storage import is_s3, join, local_path, storage_for


def local_work_dir(run_dir: str) -> Path:
    """Where rank 0 writes metrics: the run dir itself when local, else a node-local directory."""
    if not is_s3(run_dir):
        return local_path(run_dir)
    base = Path(os.environ.get("KUBELLM_CACHE_DIR", Path.home() / ".cache" / "kubellm"))
    return base / "runs" / run_dir.replace("s3://", "").replace("/", "_")


def upload_run_files(work: Path, run_dir: str) -> None:
    """Copy rank 0's metrics (JSONL, TensorBoard) to an S3 run dir (no-op for a local run dir)."""
    if not is_s3(run_dir):
        return
    st = storage_for(run_dir)
    for p in sorted(work.rglob("*")):
        if p.is_file():
            st.upload(p, join(run_dir, p.relative_to(work).as_posix()))


def restore_run_files(run_dir: str, work: Path) -> None:
    """Before a resume, fetch an S3 run dir's metrics (JSONL, TensorBoard; uploaded at every checkpoint)
    into rank 0's node-local `work` dir when it has none: a resume on another pod then keeps the earlier
    steps' rows instead of publishing a log that starts at the resume."""
    if not is_s3(run_dir) or (work / "metrics.jsonl").exists():
        return
    st = storage_for(run_dir)
    work.mkdir(parents=True, exist_ok=True)
    if st.exists(uri := join(run_dir, "metrics.jsonl")):
        st.download(uri, work / "metrics.jsonl")
    for o in st.list(join(run_dir, "tensorboard")):
        dest = work / "tensorboard" / o.relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        st.download(o.uri, dest)


def scratch_dir(prefix: str = "kubellm-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
