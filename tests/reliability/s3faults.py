"""Inject S3 faults into a boto3 client through botocore's event hooks (no proxy, no mocks of our code).

    inj = S3FaultInjector(storage.client)
    inj.fail("PutObject", 2, status=503, code="SlowDown")      # the next 2 PutObject calls get 503
    inj.reset_connection("GetObject", 1)                       # the next GetObject: connection reset
    inj.corrupt_body("GetObject")                              # every GetObject body: bytes flipped
    storage.write_bytes(...)                                   # botocore retries through them
    inj.calls["PutObject"]                                     # attempts that reached the hook

`before-send` handlers may return a response, which botocore then treats exactly like one from the
wire (parsing, retry classification, backoff); raising botocore's ConnectionClosedError there is
what urllib3 reports for a reset connection.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Callable
from typing import Any


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> list[bytes]:
        return [self.body]


def _error_xml(code: str, message: str) -> bytes:
    return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>injected</RequestId></Error>").encode()


class S3FaultInjector:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: collections.Counter[str] = collections.Counter()
        self._plans: dict[str, list[Callable[[Any], Any]]] = collections.defaultdict(list)
        self._match: dict[str, Callable[[Any], bool]] = {}
        client.meta.events.register("before-send.s3", self._before_send)

    def _before_send(self, request: Any, event_name: str = "", **_: Any) -> Any:
        op = event_name.rsplit(".", 1)[-1]
        if op in self._match and not self._match[op](request):
            return None
        self.calls[op] += 1
        plan = self._plans.get(op)
        if not plan:
            return None
        fault = plan[0] if len(plan) == 1 and getattr(plan[0], "forever", False) else plan.pop(0)
        return fault(request)

    def only_when(self, op: str, predicate: Callable[[Any], bool]) -> None:
        """Count and fault only requests of `op` for which predicate(request) is true."""
        self._match[op] = predicate

    def fail(self, op: str, times: int, status: int = 503, code: str = "SlowDown",
             message: str = "injected fault", forever: bool = False) -> None:
        from botocore.awsrequest import AWSResponse

        def respond(request: Any) -> Any:
            return AWSResponse(request.url, status, {"Content-Type": "application/xml"},
                               _Raw(_error_xml(code, message)))

        respond.forever = forever  # type: ignore[attr-defined]
        self._plans[op].extend([respond] * (1 if forever else times))

    def reset_connection(self, op: str, times: int) -> None:
        from botocore.exceptions import ConnectionClosedError

        def reset(request: Any) -> Any:
            raise ConnectionClosedError(endpoint_url=request.url)

        self._plans[op].extend([reset] * times)

    def corrupt_body(self, op: str = "GetObject") -> None:
        """Flip the first byte of every `op` response body (same length: only a checksum sees it)."""
        from botocore.response import StreamingBody

        def corrupt(parsed: dict[str, Any], **_: Any) -> None:
            body = parsed.get("Body")
            if body is None:
                return
            data = bytearray(body.read())
            if data:
                data[0] ^= 0xFF
            parsed["Body"] = StreamingBody(io.BytesIO(bytes(data)), len(data))

        self.client.meta.events.register(f"after-call.s3.{op}",
                                         lambda parsed=None, **kw: corrupt(parsed, **kw) if parsed else None)
