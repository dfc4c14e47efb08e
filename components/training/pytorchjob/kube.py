"""A thin layer over the official `kubernetes` client: configuration and transient-error retries.

    api = KubeApi.connect(api_host=None)           # in-cluster config, else ~/.kube/config
    api = KubeApi.connect(api_host="http://127.0.0.1:8001")   # kubectl proxy / tests
    job = api.call("get PyTorchJob x", api.custom.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "x")

Every call goes through `call`, which retries 429 (honouring Retry-After), 5xx and connection errors
with exponential backoff and re-raises anything else (404, 409, 403, 422 are answers, not faults).
Responses are plain dicts (`_preload_content=False` + json), the same shape `kubectl get -o json` shows.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubellm.core.errors import KubellmError

log = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeApiError(KubellmError):
    """The API server refused a request (after retries for transient errors)."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _describe(e: ApiException) -> str:
    body = e.body.decode() if isinstance(e.body, bytes) else (e.body or "")
    try:
        msg = json.loads(body).get("message") or body
    except (ValueError, AttributeError):
        msg = body
    msg = str(msg).strip()
    # 403 is also quota and terminating-namespace refusals; RBAC's says 'User "..." cannot <verb> ...'
    rbac_or_auth = e.status == 401 or (e.status == 403 and " cannot " in msg)
    hint = _AUTH_HINTS[e.status] if rbac_or_auth else ""
    return f"HTTP {e.status} {e.reason}: {msg[:500]}{hint}"


#: What to do about the two answers that mean "not this caller": the API server's message names the
#: account and the verb, not where the permission comes from.
_AUTH_HINTS = {
    401: (" (the API server did not accept the credentials: the pod's service-account token, or the"
          " kubeconfig user outside a cluster, is missing or expired)"),
    403: (" (the account this step runs as lacks RBAC permission: the kubellm Helm chart's launcher Role"
          " grants it; install the chart with rbac.create=true for this namespace (multi-user Kubeflow:"
          " list it in pipelineRunner.multiUser.namespaces) and check with `kubectl auth can-i <verb>"
          " <resource> -n <namespace> --as system:serviceaccount:<namespace>:<account>`)"),
}


@dataclass
class KubeApi:
    """The API clients the launcher needs, with retry settings."""

    api_client: client.ApiClient
    retries: int = 6
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    max_backoff_s: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @staticmethod
    def connect(api_host: str | None = None, **kw: Any) -> KubeApi:
        """Configure the client: an explicit host, else in-cluster, else kubeconfig."""
        cfg = client.Configuration()
        if api_host:
            cfg.host = api_host.rstrip("/")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            try:
                config.load_kube_config(client_configuration=cfg)
            except Exception as e:  # kubeconfig missing or broken
                raise KubellmError(
                    f"no Kubernetes API configured: not in a cluster and ~/.kube/config did not load ({e}); "
                    "set settings.api_host or KUBECONFIG"
                ) from None
        # Retries are ours (with backoff and logging); urllib3's own would hide them.
        cfg.retries = urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0, raise_on_status=False)
        return KubeApi(client.ApiClient(cfg), **kw)

    def close(self) -> None:
        self.api_client.close()

    def call(self, what: str, fn: Callable[..., Any], *args: Any, raw: bool = False, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` with transient errors retried; returns parsed JSON (or the raw
        urllib3 response with `raw=True`). Raises ApiException for non-transient HTTP errors and
        KubeApiError once retries are exhausted."""
        kwargs.setdefault("_request_timeout", self.timeout_s)
        kwargs["_preload_content"] = False
        attempt = 0
        while True:
            try:
                resp = fn(*args, **kwargs)
                if raw:
                    return resp
                data = resp.data
                return json.loads(data) if data else {}
            except ApiException as e:
                if e.status not in TRANSIENT_STATUS:
                    raise
                cause = _describe(e)
                retry_after = _retry_after(e)
            except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
                cause, retry_after = f"{type(e).__name__}: {e}", None
            if attempt >= self.retries:
                raise KubeApiError(f"{what}: giving up after {attempt + 1} attempts; last error {cause}")
            delay = min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = min(max(delay, retry_after), self.max_backoff_s)
            log.warning("%s: transient error (%s); retry %d/%d in %.2fs", what, cause, attempt + 1, self.retries, delay)
            self.sleep(delay)
            attempt += 1


def _retry_after(e: ApiException) -> float | None:
    headers = e.headers or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def service_account_namespace() -> str | None:
    """The namespace of the pod this runs in, from its mounted ServiceAccount; None outside a pod."""
    try:
        with open(_SA_NAMESPACE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def default_namespace() -> str:
    """The namespace this pod runs in (in-cluster), else the kubeconfig context's, else `default`."""
    if ns := service_account_namespace():
        return ns
    try:
        _, ctx = config.list_kube_config_contexts()
        return str(ctx.get("context", {}).get("namespace") or "default")
    except Exception:  # no kubeconfig: fall back
        return "default"
