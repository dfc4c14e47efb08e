"""A store that ignores `IfNoneMatch` / `IfMatch` (answers 200 and writes anyway: older MinIO, some
Ceph RGW), simulated by deleting the conditional headers in a botocore `before-sign` hook: writers
that run one after the other must still never overwrite a committed manifest or a moved pointer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubellm.core.errors import ManifestConflictError
from kubellm.core.manifest import MANIFEST_NAME, Manifest, commit_manifest, fetch, publish_dir, read_manifest
from kubellm.core.storage import S3Storage, join, storage_for


@pytest.fixture
def ignoring_store(s3_bucket: str) -> Iterator[tuple[S3Storage, list[str]]]:
    """The S3Storage that storage_for() gives for the bucket, its client made to drop conditional
    headers; yields it and a log of the PutObject keys it sends."""
    st = storage_for(s3_bucket)
    assert isinstance(st, S3Storage)
    puts: list[str] = []

    def strip(request: Any, **kwargs: Any) -> None:
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    def log(params: dict[str, Any], **kwargs: Any) -> None:
        puts.append(params["Key"])

    st.client.meta.events.register("before-sign.s3.PutObject", strip)
    st.client.meta.events.register("before-parameter-build.s3.PutObject", log)
    yield st, puts
    st.client.meta.events.unregister("before-sign.s3.PutObject", strip)
    st.client.meta.events.unregister("before-parameter-build.s3.PutObject", log)


def _dir(root: Path, text: str) -> Path:
    root.mkdir(parents=True)
    (root / "f.txt").write_text(text)
    return root


def test_the_simulated_store_ignores_conditions(ignoring_store: tuple[S3Storage, list[str]],
                                                s3_bucket: str) -> None:
    st, _ = ignoring_store
    uri = join(s3_bucket, "raw.txt")
    st.write_bytes(uri, b"A")
    st.client.put_object(Bucket=s3_bucket[5:], Key="raw.txt", Body=b"B", IfNoneMatch="*")  # no 412
    assert st.read_bytes(uri) == b"B"


def test_put_if_absent_and_put_if_match_refuse(ignoring_store: tuple[S3Storage, list[str]],
                                               s3_bucket: str) -> None:
    st, _ = ignoring_store
    uri = join(s3_bucket, "p/ptr.json")
    assert st.put_if_absent(uri, b"A") is True
    assert st.put_if_absent(uri, b"B") is False
    assert st.read_bytes(uri) == b"A"
    _, etag = st.read_with_etag(uri)
    assert st.put_if_match(uri, b"C", "deadbeef") is False  # stale ETag
    assert st.read_bytes(uri) == b"A"
    assert st.put_if_match(uri, b"D", etag) is True
    assert st.put_if_match(uri, b"E", etag) is False  # the ETag moved with D
    assert st.read_bytes(uri) == b"D"
    assert st.put_if_match(join(s3_bucket, "p/gone.json"), b"F", etag) is False
    assert not st.exists(join(s3_bucket, "p/gone.json"))


def test_publish_of_different_content_is_refused(ignoring_store: tuple[S3Storage, list[str]],
                                                 s3_bucket: str, tmp_path: Path) -> None:
    st, puts = ignoring_store
    prefix = join(s3_bucket, "art")
    first = publish_dir(_dir(tmp_path / "one", "one"), prefix, kind="t")
    committed = st.read_bytes(join(prefix, MANIFEST_NAME))
    puts.clear()
    with pytest.raises(ManifestConflictError, match="different manifest"):
        publish_dir(_dir(tmp_path / "two", "two"), prefix, kind="t")
    assert puts == []  # nothing written: no data file, no manifest
    assert st.read_bytes(join(prefix, MANIFEST_NAME)) == committed
    assert st.read_bytes(join(prefix, "f.txt")) == b"one"
    fetch(read_manifest(prefix), tmp_path / "fetched")  # manifest and files still agree
    assert (tmp_path / "fetched" / "f.txt").read_text() == "one"
    # the same content again: the committed manifest is returned, nothing is put
    again = publish_dir(_dir(tmp_path / "three", "one"), prefix, kind="t")
    assert again.digest() == first.digest() and puts == []


def test_commit_manifest_never_puts_over_an_existing_one(ignoring_store: tuple[S3Storage, list[str]],
                                                         s3_bucket: str) -> None:
    st, puts = ignoring_store
    prefix = join(s3_bucket, "direct")
    m = Manifest(kind="t", uri=prefix, counts={"records": 1})
    assert commit_manifest(m) == m
    committed = st.read_bytes(join(prefix, MANIFEST_NAME))
    puts.clear()
    with pytest.raises(ManifestConflictError):
        commit_manifest(Manifest(kind="other", uri=prefix))
    assert commit_manifest(Manifest(kind="t", uri=prefix, counts={"records": 1})).digest() == m.digest()
    assert puts == [] and st.read_bytes(join(prefix, MANIFEST_NAME)) == committed
