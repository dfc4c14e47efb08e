"""`kubellm run --local --bucket NEW` (local_run._setup_s3) creates the bucket in the configured region
and turns a failure into a KubellmError naming the bucket and endpoint, never the credentials."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import pytest

from kubellm.core.errors import KubellmError
from kubellm.core.storage import reset_clients, s3_client
from kubellm.pipelines.local_run import _setup_s3

SECRET = "wJalrXUtnFEMI-not-a-real-secret"


def _args(endpoint: str, bucket: str) -> argparse.Namespace:
    return argparse.Namespace(s3_endpoint=endpoint, bucket=bucket, prefix="kubellm")


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "ap-southeast-2"])
def test_new_bucket_is_created_in_the_region(s3_env: str, monkeypatch: pytest.MonkeyPatch, region: str) -> None:
    monkeypatch.setenv("AWS_REGION", region)
    reset_clients()
    bucket = f"new-{uuid.uuid4().hex[:10]}"
    assert _setup_s3(_args(s3_env, bucket)) == f"s3://{bucket}/kubellm"
    location = s3_client().get_bucket_location(Bucket=bucket)["LocationConstraint"]
    assert (location or "us-east-1") == region
    assert _setup_s3(_args(s3_env, bucket)) == f"s3://{bucket}/kubellm"  # exists now: left as it is


def test_create_failure_names_bucket_and_endpoint_not_credentials(
        s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.awsrequest import AWSResponse

    import kubellm.core.storage as storage_mod

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    real_client = storage_mod.s3_client

    class _Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **kwargs: Any) -> Any:
            yield self.body

    def deny(request: Any, **kwargs: Any) -> AWSResponse:
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        return AWSResponse(request.url, 403, {}, _Raw(body))

    def client_denying_create(*a: Any, **kw: Any) -> Any:
        client = real_client(*a, **kw)
        client.meta.events.register("before-send.s3.CreateBucket", deny)
        return client

    monkeypatch.setattr(storage_mod, "s3_client", client_denying_create)
    endpoint = s3_env.replace("http://", "http://admin:hunter2@")
    with pytest.raises(KubellmError) as err:
        _setup_s3(_args(endpoint, "denied-bucket"))
    msg = str(err.value)
    assert "'denied-bucket'" in msg and "AccessDenied" in msg and "could not create" in msg, msg
    assert s3_env.split("//")[1] in msg  # host:port of the endpoint
    assert "hunter2" not in msg and SECRET not in msg, msg
