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


def test_a_lease_that_exists_but_cannot_be_read_is_an_error_not_an_endless_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`read_with_etag` failing on an existing lease (permissions, a store that keeps failing) had the
    publisher spin with no sleep and no end, never saying why."""
    prefix = str(tmp_path / "artifacts/sft/abc")
    st = storage_for(prefix)
    st.write_bytes(join(prefix, LEASE_NAME), b'{"owner": "someone", "expires": 1e12}')
    calls = []

    def unreadable(self: Any, uri: str) -> tuple[bytes, str]:
        calls.append(uri)
        raise PermissionError(f"{uri}: permission denied")

    monkeypatch.setattr(type(st), "read_with_etag", unreadable)
    monkeypatch.setattr(manifest_mod.time, "sleep", lambda s: None)
    with pytest.raises(PermissionError, match="permission denied"):
        publish_dir(_dir(tmp_path / "run", "w"), prefix, kind="model")
    assert len(calls) == manifest_mod.LEASE_READ_TRIES


def test_a_commit_between_the_manifest_check_and_the_lease_uploads_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publisher A commits and releases its lease after B looked for the manifest and before B's put: B
    must not upload its (different) files over A's committed artifact."""
    prefix = str(tmp_path / "artifacts/sft/abc")
    a = publish_dir(_dir(tmp_path / "run-a", "weights of run A"), str(tmp_path / "elsewhere"), kind="model")
    st = storage_for(prefix)
    real_put = type(st).put_if_absent
    uploads: list[str] = []

    def a_commits_first(self: Any, uri: str, data: bytes) -> bool:
        if uri.endswith(LEASE_NAME) and not self.exists(join(prefix, "_manifest.json")):
            manifest_mod.commit_manifest(a.model_copy(update={"uri": prefix}))
            for f in a.files:  # A's files, as A uploaded them before its commit
                self.upload(Path(a.uri) / f.path, join(prefix, f.path))
        return real_put(self, uri, data)

    real_upload = type(st).upload
    monkeypatch.setattr(type(st), "put_if_absent", a_commits_first)
    monkeypatch.setattr(type(st), "upload",
                        lambda self, local, uri: uploads.append(str(local)) or real_upload(self, local, uri))
    with pytest.raises(ManifestConflictError):
        publish_dir(_dir(tmp_path / "run-b", "run B's other weights"), prefix, kind="model")
    assert uploads and not [u for u in uploads if "run-b" in u]  # A's uploads only, none of B's
    fetch(read_manifest(prefix), tmp_path / "check")  # A's artifact still verifies
    assert not st.exists(join(prefix, LEASE_NAME))


def test_an_artifact_committed_elsewhere_first_is_returned_at_its_new_place(tmp_path: Path) -> None:
    import shutil

    a = publish_dir(_dir(tmp_path / "run", "w"), str(tmp_path / "A"), kind="model")
    shutil.copytree(tmp_path / "A", tmp_path / "B")  # the artifact copied, manifest and all
    b = publish_dir(tmp_path / "run", str(tmp_path / "B"), kind="model")
    assert b.uri == str(tmp_path / "B") and b.digest() == read_manifest(str(tmp_path / "B")).digest()
    assert a.uri == str(tmp_path / "A")


def test_a_file_that_changes_while_it_is_published_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = str(tmp_path / "artifacts/sft/abc")
    st = storage_for(prefix)
    real_upload = type(st).upload

    def writer_still_flushing(self: Any, local: Path, uri: str) -> None:
        real_upload(self, local, uri)
        if local.name == "metrics.jsonl":
            with open(local, "a") as f:
                f.write('{"step_time_s": 9}\n')

    monkeypatch.setattr(type(st), "upload", writer_still_flushing)
    from kubellm.core.errors import IntegrityError

    with pytest.raises(IntegrityError, match=r"metrics\.jsonl: changed while it was published"):
        publish_dir(_dir(tmp_path / "run", "w"), prefix, kind="model")
    assert not st.exists(join(prefix, "_manifest.json"))
