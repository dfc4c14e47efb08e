"""Two publishers of one content address (two runs of a stage on the same inputs, caching off): the
second must never upload over the files of the artifact the first committed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import kubellm.core.manifest as manifest_mod
from kubellm.core.errors import ManifestConflictError
from kubellm.core.manifest import LEASE_NAME, fetch, publish_dir, read_manifest
from kubellm.core.storage import join, storage_for


def _dir(root: Path, text: str) -> Path:
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "weights.bin").write_text(text)
    (root / "metrics.jsonl").write_text(f'{{"step_time_s": {len(text)}}}\n')
    return root


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "artifacts")
    return request.getfixturevalue("s3_bucket")


def test_a_second_publisher_waits_and_never_overwrites_the_first(root: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "LEASE_TTL_S", 1.5)  # renewed every 0.5 s while A uploads for 2 s
    prefix = join(root, "sft/abc")
    st = storage_for(prefix)
    real_upload = type(st).upload
    a_uploading = threading.Event()

    def slow_upload(self: Any, local: Path, uri: str) -> None:
        if "run-a" in str(local):
            a_uploading.set()
            time.sleep(1.0)
        real_upload(self, local, uri)

    monkeypatch.setattr(type(st), "upload", slow_upload)
    results: dict[str, Any] = {}

    def publish(name: str, text: str) -> None:
        try:
            results[name] = publish_dir(_dir(tmp_path / f"run-{name}", text), prefix, kind="model")
        except ManifestConflictError as e:
            results[name] = e

    a = threading.Thread(target=publish, args=("a", "weights of run A"))
    a.start()
    assert a_uploading.wait(10)
    b = threading.Thread(target=publish, args=("b", "run B's other weights"))
    b.start()
    a.join(30)
    b.join(30)
    committed = read_manifest(prefix)
    assert results["a"].digest() == committed.digest()
    assert isinstance(results["b"], ManifestConflictError)  # B uploaded nothing: it waited for A
    fetch(committed, tmp_path / "check")  # before: B's files were over A's, and this failed forever
    assert (tmp_path / "check" / "hf" / "weights.bin").read_text() == "weights of run A"
    assert not st.exists(join(prefix, LEASE_NAME))  # released after the commit


def test_a_dead_publishers_lease_is_taken_over_once_expired(root: str, tmp_path: Path) -> None:
    prefix = join(root, "sft/def")
    st = storage_for(prefix)
    st.write_bytes(join(prefix, LEASE_NAME), json.dumps({"owner": "dead", "expires": time.time() - 1}).encode())
    m = publish_dir(_dir(tmp_path / "run", "w"), prefix, kind="model")
    assert read_manifest(prefix).digest() == m.digest()
    assert not st.exists(join(prefix, LEASE_NAME))


def test_an_already_committed_artifact_takes_no_lease(tmp_path: Path) -> None:
    prefix = str(tmp_path / "artifacts" / "x")
    first = publish_dir(_dir(tmp_path / "one", "same"), prefix, kind="model")
    st = storage_for(prefix)
    st.write_bytes(join(prefix, LEASE_NAME), json.dumps({"owner": "someone", "expires": time.time() + 600}).encode())
    # a live lease does not block a re-run that finds the manifest: it uploads nothing and returns it
    assert publish_dir(_dir(tmp_path / "two", "same"), prefix, kind="model").digest() == first.digest()


def test_a_publisher_that_cannot_renew_stops_uploading_once_its_lease_expires(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut off from the store for a whole TTL, a publisher must assume a successor took the lease over:
    it uploads no further file and commits nothing (its late uploads had landed over the successor's)."""
    monkeypatch.setattr(manifest_mod, "LEASE_TTL_S", 0.6)
    prefix = str(tmp_path / "artifacts" / "pretrain" / "abc")
    st = storage_for(prefix)
    real_upload, uploaded = type(st).upload, []

    def slow_upload(self: Any, local: Path, uri: str) -> None:
        uploaded.append(uri)
        time.sleep(0.5)
        real_upload(self, local, uri)

    def no_renewal(self: Any, uri: str, data: bytes, etag: str) -> bool:
        raise OSError("the store is unreachable")

    monkeypatch.setattr(type(st), "upload", slow_upload)
    monkeypatch.setattr(type(st), "put_if_match", no_renewal)
    src = tmp_path / "run"
    for i in range(6):
        (src / f"part-{i}.bin").parent.mkdir(parents=True, exist_ok=True)
        (src / f"part-{i}.bin").write_text(f"shard {i}")
    with pytest.raises(ManifestConflictError, match=r"lost the artifact's publishing lease .*renewals failed"):
        publish_dir(src, prefix, kind="model", workers=1)
    assert 1 <= len(uploaded) < 6  # stopped part-way, at the expiry
    assert not st.exists(join(prefix, "_manifest.json"))
