"""What a flaky network and a failed check must not do: report an applied compare-and-swap as lost,
leave an unverified file where a cache takes it for fetched, or put an endpoint password in a
traceback."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from kubellm.core.errors import IntegrityError, StorageError
from kubellm.core.manifest import publish_dir
from kubellm.core.storage import S3Storage, join, redact, reset_clients, storage_for


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _applied_then_lost(st: S3Storage, monkeypatch: pytest.MonkeyPatch, code: str, status: int) -> None:
    """put_object applies the write, then fails like botocore's retry of a lost response does."""
    real = st.client.put_object

    def put(**kw: Any) -> Any:
        plain = {k: v for k, v in kw.items() if k not in ("IfMatch", "IfNoneMatch")}
        real(**plain)
        raise _client_error(code, status)

    monkeypatch.setattr(st.client, "put_object", put)


def _pointer(s3_bucket: str) -> tuple[S3Storage, str, str]:
    st = storage_for(s3_bucket)
    assert isinstance(st, S3Storage)
    uri = join(s3_bucket, "pointer.json")
    st.write_bytes(uri, b"one")
    return st, uri, st.read_with_etag(uri)[1]


def test_a_swap_applied_before_a_lost_response_is_reported_as_done(s3_bucket: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    st, uri, etag = _pointer(s3_bucket)
    _applied_then_lost(st, monkeypatch, "PreconditionFailed", 412)
    assert st.put_if_match(uri, b"two", etag) is True  # before: False, "two was NOT promoted"
    assert st.read_bytes(uri) == b"two"
    other = join(s3_bucket, "new.json")
    assert st.put_if_absent(other, b"first") is True
    monkeypatch.undo()
    # a real conflict is still one: another writer's bytes are there
    st.write_bytes(uri, b"three")
    assert st.put_if_match(uri, b"four", etag) is False and st.read_bytes(uri) == b"three"


def test_put_if_match_falls_back_where_the_store_has_no_if_match(s3_bucket: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    st, uri, etag = _pointer(s3_bucket)
    real = st.client.put_object

    def put(**kw: Any) -> Any:
        if "IfMatch" in kw:
            raise _client_error("NotImplemented", 501)
        return real(**kw)

    monkeypatch.setattr(st.client, "put_object", put)
    assert st.put_if_match(uri, b"two", etag) is True  # before: StorageError NotImplemented
    assert st.put_if_match(uri, b"three", etag) is False  # the HEAD still refuses a stale ETag
    assert st.read_bytes(uri) == b"two"


def test_a_file_that_fails_verification_is_not_left_for_the_cache(s3_bucket: str, tmp_path: Path) -> None:
    from kubellm.training.data import stage_artifact_files

    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "train" / "a.tok").write_bytes(b"AAAAA")
    m = publish_dir(src, join(s3_bucket, "tokens/x"), kind="token_shards")
    storage_for(s3_bucket).write_bytes(m.file_uri("train/a.tok"), b"BBBBB")  # same size, other bytes
    cache = tmp_path / "cache"
    for _ in range(2):  # before: the second call found a file of the right size and used it
        with pytest.raises(IntegrityError, match=r"a\.tok: sha256"):
            stage_artifact_files(m, ["train/"], cache)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_an_endpoint_password_never_reaches_a_traceback_or_an_error_file(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    from kubellm.training.job import JobSpec, write_error

    monkeypatch.setenv("KUBELLM_S3_ENDPOINT_URL", "http://someone:secretpw@127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("KUBELLM_S3_MAX_ATTEMPTS", "1")
    reset_clients()
    try:
        st = storage_for("s3://b/k")
        # every operation, the conditional writes and HEAD too (they had let connection errors through raw)
        for op in (lambda: st.read_bytes("s3://b/k"), lambda: st.exists("s3://b/k"),
                   lambda: st.put_if_absent("s3://b/k", b"x"), lambda: st.put_if_match("s3://b/k", b"x", "e"),
                   lambda: st.write_bytes("s3://b/k", b"x"), lambda: st.list("s3://b/")):
            with pytest.raises(StorageError) as info:
                op()
            text = "".join(traceback.format_exception(info.value))
            assert "secretpw" not in text and "***@" in text  # before: botocore's chained error quoted it
    finally:
        reset_clients()
    assert redact("http://minio:p@ss@host:9000/b") == "http://***@host:9000/b"  # an '@' in the password
    assert redact("http://minio:p/ss@host:9000/b") == "http://***@host:9000/b"  # a '/' in it (was: unchanged)
    assert redact("get https://TOKEN@host/x failed") == "get https://***@host/x failed"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAEX%2F1&X-Amz-Signature=0a1b&partNumber=2"
    assert redact(signed) == "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&partNumber=2"
    assert redact("s3://b/raw/x.jsonl@etag:12 and hf:org/ds@abc") == "s3://b/raw/x.jsonl@etag:12 and hf:org/ds@abc"
    spec = JobSpec(stage="pretrain", config={}, output=str(tmp_path), run_dir=str(tmp_path / "run"))
    write_error(spec, 0, "Traceback ...\nEndpointConnectionError: http://someone:secretpw@127.0.0.1:9/b/k\n")
    written = (tmp_path / "run" / "errors" / "rank0.txt").read_text()
    assert "secretpw" not in written and "someone" not in written


def test_a_body_that_breaks_mid_read_is_fetched_again(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore retries a request, not the reading of its streamed body: a connection reset there is
    retried by the storage layer (a manifest or lease read had failed outright)."""
    from botocore.exceptions import ResponseStreamingError

    st = storage_for(s3_bucket)
    assert isinstance(st, S3Storage)
    uri = join(s3_bucket, "flaky.json")
    st.write_bytes(uri, b'{"ok": true}')
    real, calls = st.client.get_object, []

    def get_object(**kw: Any) -> Any:
        resp = real(**kw)
        calls.append(1)
        if len(calls) <= 2:  # the first two bodies break while being read
            def broken() -> bytes:
                raise ResponseStreamingError(error="Connection reset by peer")
            resp["Body"].read = broken
        return resp

    monkeypatch.setattr(st.client, "get_object", get_object)
    assert st.read_bytes(uri) == b'{"ok": true}' and len(calls) == 3
    data, etag = st.read_with_etag(uri)
    assert data == b'{"ok": true}' and etag
