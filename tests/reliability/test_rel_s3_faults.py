"""S3 faults against the local S3 server (moto), injected into the real boto3 client.

    .venv/bin/python -m pytest tests/reliability/test_rel_s3_faults.py -q

Throttling (503 SlowDown), 500s and connection resets are retried by botocore's `standard` retry
mode and the transfer succeeds; persistent faults fail with a StorageError naming the operation and
the object; a body corrupted in transit is caught by the manifest's sha256; a multipart upload whose
parts keep failing is aborted; a committed manifest is never overwritten (also on a store without
conditional puts), and a refused second publish does not touch the committed artifact's files;
readers refuse a prefix whose manifest never landed; concurrent writers of one content-addressed
artifact and writers of different artifacts in one bucket never clobber each other. The multipart
connection-reset case and the basic refusals are in tests/core (not repeated here).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from s3faults import S3FaultInjector

from kubellm.core.errors import IntegrityError, ManifestConflictError, ManifestMissingError, StorageError
from kubellm.core.manifest import (
    MANIFEST_NAME,
    content_prefix,
    fetch,
    load_manifest_ref,
    publish_dir,
    read_manifest,
)
from kubellm.core.storage import S3Settings, S3Storage, join, split_s3


def _storage(monkeypatch: pytest.MonkeyPatch, **overrides: object) -> tuple[S3Storage, S3FaultInjector]:
    """A fresh S3Storage (its own client, so hooks stay in this test) that storage_for() also returns."""
    import kubellm.core.storage as storage_mod

    settings = S3Settings(**{**S3Settings.from_env().__dict__, **overrides})
    st = S3Storage(settings)
    monkeypatch.setattr(storage_mod, "storage_for", lambda uri: st if storage_mod.is_s3(uri) else
                        storage_mod.LocalStorage())
    import kubellm.core.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "storage_for", storage_mod.storage_for)
    return st, S3FaultInjector(st.client)


def _artifact(root: Path, text: str) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "part-0.txt").write_text(text)
    (root / "report.md").write_text(f"report for {text}")
    return root


def test_throttling_5xx_and_resets_are_retried(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    st, inj = _storage(monkeypatch, max_attempts=5)
    uri = join(s3_bucket, "retry/obj.bin")
    inj.fail("PutObject", 1, status=503, code="SlowDown")
    inj.fail("PutObject", 1, status=500, code="InternalError")
    st.write_bytes(uri, b"payload")
    assert inj.calls["PutObject"] == 3  # two faults, then the real put
    inj.reset_connection("GetObject", 1)
    inj.fail("GetObject", 1, status=503, code="ServiceUnavailable")
    assert st.read_bytes(uri) == b"payload"
    assert inj.calls["GetObject"] == 3


def test_persistent_faults_fail_with_a_clear_error(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    st, inj = _storage(monkeypatch, max_attempts=2)
    uri = join(s3_bucket, "down/obj.bin")
    inj.fail("PutObject", 0, status=503, code="SlowDown", message="Please reduce your request rate.",
             forever=True)
    with pytest.raises(StorageError) as err:
        st.write_bytes(uri, b"x")
    msg = str(err.value)
    assert uri in msg and "SlowDown" in msg and "put" in msg, msg
    assert inj.calls["PutObject"] == 2  # max_attempts honoured, then a clear failure


def test_body_corrupted_in_transit_is_caught_by_the_manifest(s3_bucket: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    st, inj = _storage(monkeypatch)
    prefix = join(s3_bucket, "art/a")
    m = publish_dir(_artifact(tmp_path / "src", "hello world"), prefix, kind="test")
    inj.corrupt_body("GetObject")
    with pytest.raises(IntegrityError) as err:
        fetch(m, tmp_path / "out", paths=["data/part-0.txt"])
    assert join(prefix, "data/part-0.txt") in str(err.value) and "sha256" in str(err.value)


def test_multipart_upload_with_throttled_parts_is_aborted(s3_bucket: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    st, inj = _storage(monkeypatch, multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024,
                       max_concurrency=2, max_attempts=2)
    inj.fail("UploadPart", 0, status=503, code="SlowDown", forever=True)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\2" * (11 * 1024 * 1024))
    uri = join(s3_bucket, "mp/big.bin")
    with pytest.raises(StorageError, match="big.bin"):
        st.upload(big, uri)
    bucket, _ = split_s3(uri)
    assert st.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not st.exists(uri)


def test_manifest_never_overwritten_even_without_conditional_puts(s3_bucket: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    st, inj = _storage(monkeypatch)
    prefix = join(s3_bucket, "art/same-prefix")
    first = publish_dir(_artifact(tmp_path / "a", "first"), prefix, kind="test")
    before = {o.relpath: o.etag for o in st.list(prefix)}
    # a store that does not implement If-None-Match answers 501: the check-then-put fallback runs
    inj.only_when("PutObject", lambda req: "If-None-Match" in req.headers)
    inj.fail("PutObject", 1, status=501, code="NotImplemented")
    with pytest.raises(ManifestConflictError, match="refusing to overwrite"):
        publish_dir(_artifact(tmp_path / "b", "second"), prefix, kind="test")
    assert {o.relpath: o.etag for o in st.list(prefix)} == before  # not one byte of it replaced
    assert read_manifest(prefix).digest() == first.digest()
    fetch(first, tmp_path / "check")  # every file still matches its sha256
    again = publish_dir(_artifact(tmp_path / "c", "first"), prefix, kind="test")  # an identical re-run
    assert again.digest() == first.digest()


def test_reader_refuses_a_prefix_whose_manifest_never_landed(s3_bucket: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    st, inj = _storage(monkeypatch, max_attempts=2)
    prefix = join(s3_bucket, "art/torn")
    inj.only_when("PutObject", lambda req: req.url.endswith(MANIFEST_NAME))
    inj.fail("PutObject", 0, status=500, code="InternalError", forever=True)
    with pytest.raises(StorageError, match=MANIFEST_NAME):
        publish_dir(_artifact(tmp_path / "a", "data"), prefix, kind="test")
    assert {o.relpath for o in st.list(prefix)} == {"data/part-0.txt", "report.md"}  # garbage, not an artifact
    for read in (read_manifest, load_manifest_ref):
        with pytest.raises(ManifestMissingError, match="not a committed artifact"):
            read(prefix)


def test_concurrent_writers_never_clobber(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _storage(monkeypatch)
    root = join(s3_bucket, "kubellm")
    # two runs of the same stage on the same inputs: one content-addressed prefix, identical bytes
    same = content_prefix(root, "tokenizer", "cfg-1", {"dataset": "d1"})
    # a run with another config: another prefix
    other = content_prefix(root, "tokenizer", "cfg-2", {"dataset": "d1"})
    assert same != other
    jobs = [(same, "A"), (same, "A"), (other, "B")]
    results: dict[int, object] = {}

    def write(i: int, prefix: str, text: str) -> None:
        try:
            results[i] = publish_dir(_artifact(tmp_path / f"w{i}", text), prefix, kind="test")
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=write, args=(i, p, t)) for i, (p, t) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    assert results[0].digest() == results[1].digest()  # type: ignore[attr-defined]
    for prefix, text in ((same, "A"), (other, "B")):
        out = fetch(read_manifest(prefix), tmp_path / "read" / text)
        assert (out / "data" / "part-0.txt").read_text() == text
