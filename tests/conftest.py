"""Shared fixtures: a real S3 protocol endpoint (moto's threaded server on 127.0.0.1)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

# DeepSpeed picks its accelerator at import; there is no GPU in CI.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server bound to loopback (its default is every interface). Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point kubellm's S3 client at the local server with throwaway credentials."""
    from kubellm.core.storage import reset_clients

    monkeypatch.setenv("KUBELLM_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    reset_clients()
    yield s3_server
    reset_clients()


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh bucket on the local server; yields its s3:// root."""
    from kubellm.core.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"
