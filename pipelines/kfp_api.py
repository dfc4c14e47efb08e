"""Talking to a Kubeflow Pipelines endpoint: connect with `kfp.Client`, authenticate, explain errors.

    client = connect("https://kubeflow.example.com/pipeline", namespace="team-ml")

Authentication for multi-user Kubeflow comes from the environment only — never from the command line
(it would land in shell history and CI logs) and never printed:
  KUBELLM_KFP_TOKEN    a bearer token (e.g. `kubectl create token default-editor -n team-ml
                       --audience=pipelines.kubeflow.org`, or an OIDC id token for the gateway)
  KUBELLM_KFP_COOKIE   a session cookie, e.g. `authservice_session=...` or `oauth2_proxy_kubeflow=...`
  KUBELLM_KFP_ENDPOINT the endpoint when --endpoint is not given
  KF_PIPELINES_SA_TOKEN_PATH  a file holding a projected ServiceAccount token (audience pipelines.kubeflow.org),
                       as the Helm chart's jobs mount it; without KUBELLM_KFP_TOKEN that token is sent, re-read
                       before every request (the kubelet rotates it). With neither variable set, kfp's default
                       path /var/run/secrets/kubeflow/pipelines/token is used when that file exists.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kubellm.core.errors import KubellmError
from kubellm.core.storage import redact

TOKEN_ENV = "KUBELLM_KFP_TOKEN"
COOKIE_ENV = "KUBELLM_KFP_COOKIE"
ENDPOINT_ENV = "KUBELLM_KFP_ENDPOINT"
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
SA_TOKEN_DEFAULT_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp.client.KF_PIPELINES_SA_TOKEN_PATH
FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")
FAILED_STATES = ("FAILED", "SKIPPED", "CANCELED", "CANCELING")  # a run in one of these will not succeed


class KfpApiError(KubellmError):
    """The KFP API refused or failed a request; the message says which and what to do."""


def sa_token_path() -> str | None:
    """The ServiceAccount token file to authenticate with, or None: only when KUBELLM_KFP_TOKEN is not set;
    $KF_PIPELINES_SA_TOKEN_PATH when set, else kfp's default path if that file exists."""
    if os.environ.get(TOKEN_ENV):
        return None
    path = os.environ.get(SA_TOKEN_ENV)
    if path:
        return path
    return SA_TOKEN_DEFAULT_PATH if os.path.isfile(SA_TOKEN_DEFAULT_PATH) else None


def _read_sa_token(path: str) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise KfpApiError(f"cannot read the KFP ServiceAccount token file {path!r} ({e.strerror or e}): "
                          f"check the projected token volume, or unset {SA_TOKEN_ENV}") from None
    if not token:
        raise KfpApiError(f"the KFP ServiceAccount token file {path!r} is empty")
    return token


def auth_headers() -> dict[str, str]:
    headers = {}
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    elif (path := sa_token_path()) is not None:
        headers["Authorization"] = f"Bearer {_read_sa_token(path)}"
    if os.environ.get(COOKIE_ENV):
        headers["Cookie"] = os.environ[COOKIE_ENV]
    return headers


def _auth_hint() -> str:
    have = [v for v in (TOKEN_ENV, COOKIE_ENV) if os.environ.get(v)]
    if (path := sa_token_path()) is not None:
        have.insert(0, f"the ServiceAccount token file {path}")
    if have:
        return f"the credentials in {' and '.join(have)} were refused (expired? wrong namespace/profile?)"
    return (f"multi-user Kubeflow needs credentials: set {TOKEN_ENV} (bearer token) or {COOKIE_ENV} "
            f"(session cookie) in the environment, or mount a projected ServiceAccount token "
            f"(audience pipelines.kubeflow.org) and set {SA_TOKEN_ENV} to its path")


def resolve_endpoint(endpoint: str | None) -> str:
    ep = (endpoint or os.environ.get(ENDPOINT_ENV) or "").rstrip("/")
    if not ep:
        raise KfpApiError(f"no KFP endpoint: pass --endpoint URL or set {ENDPOINT_ENV} (e.g. "
                          "http://localhost:8080 after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)")
    if not ep.startswith(("http://", "https://")):
        raise KfpApiError(f"--endpoint {redact(ep)!r}: expected an http:// or https:// URL")
    return ep


def preflight(endpoint: str, timeout: float = 15.0) -> dict[str, Any]:
    """GET /apis/v2beta1/healthz once, so an unreachable endpoint or refused credentials fail fast
    with a clear message (kfp.Client would retry for half a minute and then print a traceback)."""
    url = f"{endpoint}/apis/v2beta1/healthz"
    where, shown = redact(endpoint), redact(url)  # a user:password@ in the URL is never printed
    req = urllib.request.Request(url, headers={"Accept": "application/json", **auth_headers()})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise KfpApiError(f"KFP at {where} answered HTTP {e.code}: {_auth_hint()}") from None
        raise KfpApiError(f"KFP at {where} answered HTTP {e.code} on {shown}: {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise KfpApiError(f"cannot reach KFP at {where}: {redact(str(reason))} (check --endpoint, the port-forward "
                          "or ingress, and the network)") from None
    if "json" not in ctype:
        raise KfpApiError(f"KFP at {where} returned {ctype or 'no content type'}, not JSON, for {shown} — "
                          f"probably a login page: {_auth_hint()}")
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError:
        raise KfpApiError(f"KFP at {where}: healthz returned invalid JSON") from None


def connect(endpoint: str | None, namespace: str | None = None) -> Any:
    """A `kfp.Client` for `endpoint` with the environment's credentials, after a preflight check.

    KUBELLM_KFP_TOKEN wins; else a ServiceAccount token file (see `sa_token_path`) is sent through kfp's
    own ServiceAccountTokenVolumeCredentials, which re-reads it before every request. (kfp.Client loads
    those credentials by itself only when no host is given; we always give one.)"""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    ep = resolve_endpoint(endpoint)
    preflight(ep)  # also fails clearly when the token file cannot be read
    token = os.environ.get(TOKEN_ENV) or None
    path = sa_token_path()  # None whenever the token above is set
    credentials = ServiceAccountTokenVolumeCredentials(path) if path is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2+"
        client = kfp.Client(host=ep, namespace=namespace or "kubeflow", existing_token=token,
                            credentials=credentials, cookies=os.environ.get(COOKIE_ENV) or None)
    if namespace:
        # kfp.Client only records a namespace other than "kubeflow"; be explicit for every call.
        client._context_setting["namespace"] = namespace
    return client


@contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Turn kfp_server_api/urllib3 exceptions into one clear KfpApiError naming the operation."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError as Urllib3Error

    try:
        yield
    except ApiException as e:
        detail = _api_message(e)
        if e.status in (401, 403):
            raise KfpApiError(f"{what}: HTTP {e.status} {detail}: {_auth_hint()}") from None
        if e.status == 409:
            raise KfpApiError(f"{what}: conflict (HTTP 409): {detail}") from None
        raise KfpApiError(f"{what}: HTTP {e.status} {detail}") from None
    except Urllib3Error as e:
        raise KfpApiError(redact(f"{what}: cannot reach the KFP API: {e}")) from None


def _api_message(e: Any) -> str:
    try:
        data = json.loads(e.body or "{}")
        return str(data.get("message") or data.get("error") or e.reason)
    except (ValueError, TypeError):
        return str(e.reason)


def run_url(endpoint: str, run_id: str) -> str:
    return redact(f"{endpoint.rstrip('/')}/#/runs/details/{run_id}")


def eq_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})
