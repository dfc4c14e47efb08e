"""Bad S3 environment settings fail up front with a StorageError naming the variable, the value and
what is allowed — never a ValueError/botocore traceback, nor a failure only at the first upload."""

from __future__ import annotations

import pytest

from kubellm.core.errors import StorageError
from kubellm.core.storage import S3Settings, reset_clients, storage_for

MiB = 1024 * 1024

S3_VARS = ("KUBELLM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
           "KUBELLM_S3_RETRY_MODE", "KUBELLM_S3_MAX_ATTEMPTS", "KUBELLM_S3_ADDRESSING_STYLE",
           "KUBELLM_S3_MULTIPART_THRESHOLD", "KUBELLM_S3_MULTIPART_CHUNKSIZE", "KUBELLM_S3_MAX_CONCURRENCY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in S3_VARS:
        monkeypatch.delenv(var, raising=False)
    reset_clients()


@pytest.mark.parametrize(("var", "value", "allowed"), [
    ("KUBELLM_S3_MAX_ATTEMPTS", "abc", "integer >= 1"),
    ("KUBELLM_S3_MAX_ATTEMPTS", "0", "integer >= 1"),
    ("KUBELLM_S3_MAX_ATTEMPTS", "-3", "integer >= 1"),
    ("KUBELLM_S3_MAX_ATTEMPTS", "2.5", "integer >= 1"),
    ("KUBELLM_S3_ADDRESSING_STYLE", "bogus", "path, virtual, auto"),
    ("KUBELLM_S3_RETRY_MODE", "sometimes", "standard, adaptive"),
    ("KUBELLM_S3_RETRY_MODE", "legacy", "not supported"),
    ("KUBELLM_S3_MAX_CONCURRENCY", "0", "integer >= 1"),
    ("KUBELLM_S3_MAX_CONCURRENCY", "many", "integer >= 1"),
    ("KUBELLM_S3_MULTIPART_THRESHOLD", "0", "integer >= 1"),
    ("KUBELLM_S3_MULTIPART_CHUNKSIZE", "1000", "5 MiB to 5 GiB"),
    ("KUBELLM_S3_MULTIPART_CHUNKSIZE", str(6 * 1024 * MiB), "5 MiB to 5 GiB"),
    ("KUBELLM_S3_ENDPOINT_URL", "minio:9000", "http:// or https://"),
    ("KUBELLM_S3_ENDPOINT_URL", "http://", "http:// or https://"),
    ("KUBELLM_S3_ENDPOINT_URL", "http://minio:port", "http:// or https://"),
    ("AWS_ENDPOINT_URL", "ftp://minio", "http:// or https://"),
    ("AWS_REGION", "eu west 1", "region name"),
    ("AWS_DEFAULT_REGION", "eu_west_1", "region name"),
])
def test_bad_setting_is_named(monkeypatch: pytest.MonkeyPatch, var: str, value: str, allowed: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(StorageError) as err:
        S3Settings.from_env()
    msg = str(err.value)
    assert var in msg and repr(value) in msg and allowed in msg, msg
    with pytest.raises(StorageError, match=var):  # what every S3 user gets, before any request
        storage_for("s3://bucket/key")


def test_endpoint_credentials_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELLM_S3_ENDPOINT_URL", "minio://admin:hunter2@minio:9000")
    with pytest.raises(StorageError, match="KUBELLM_S3_ENDPOINT_URL") as err:
        S3Settings.from_env()
    assert "hunter2" not in str(err.value) and "***@" in str(err.value)


def test_good_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert S3Settings.from_env() == S3Settings()  # nothing set: the defaults
    for var in S3_VARS:
        monkeypatch.setenv(var, "")  # empty counts as unset (templated env often renders "")
    assert S3Settings.from_env() == S3Settings()
    monkeypatch.setenv("KUBELLM_S3_RETRY_MODE", "Adaptive")
    monkeypatch.setenv("KUBELLM_S3_ADDRESSING_STYLE", "virtual")
    monkeypatch.setenv("KUBELLM_S3_MAX_ATTEMPTS", " 3 ")
    monkeypatch.setenv("KUBELLM_S3_MULTIPART_CHUNKSIZE", str(5 * MiB))
    monkeypatch.setenv("KUBELLM_S3_MAX_CONCURRENCY", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.com:9443")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s = S3Settings.from_env()
    assert (s.retry_mode, s.addressing_style, s.max_attempts, s.multipart_chunksize, s.max_concurrency,
            s.endpoint_url, s.region) == ("adaptive", "virtual", 3, 5 * MiB, 1,
                                          "https://s3.example.com:9443", "eu-west-1")
    cfg = storage_for("s3://bucket/key").client.meta.config  # type: ignore[attr-defined]
    assert cfg.retries == {"mode": "adaptive", "total_max_attempts": 3}
    assert cfg.s3 == {"addressing_style": "virtual"}


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(StorageError, match="S3Settings.max_concurrency=0"):
        S3Settings(max_concurrency=0)
    with pytest.raises(StorageError, match="S3Settings.retry_mode='legacy'"):
        S3Settings(retry_mode="legacy")


def test_storage_errors_never_echo_endpoint_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubellm.core.storage import S3Storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    st = S3Storage(S3Settings(endpoint_url="http://admin:hunter2@127.0.0.1:1", max_attempts=1))
    with pytest.raises(StorageError, match="s3://bucket/key") as err:
        st.read_bytes("s3://bucket/key")
    assert "hunter2" not in str(err.value) and "***@127.0.0.1:1" in str(err.value), str(err.value)
