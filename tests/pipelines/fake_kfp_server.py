"""A fake Kubeflow Pipelines API (v2beta1) on 127.0.0.1 — the endpoints kfp.Client 2.16 calls.

    with FakeKfp(token="t0ken") as kfp_api:          # requests without "Bearer t0ken" get HTTP 401
        kfp.Client(host=kfp_api.url, existing_token="t0ken").list_runs()
        kfp_api.requests                              # every request: method, path, query, headers, body

Implements healthz; experiments (create/list/get); pipelines (upload, upload_version, list, get,
versions list/get); runs (create, get, list; `run_states` scripts the states successive GETs see);
recurring runs (create, list, get, delete, enable, disable). `display_name EQUALS` filters work.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

#: the run-config values a cluster run needs (an s3:// storage root and the input data), as --set flags
SUBMIT_SOURCES = ("--set", "storage.root=s3://b/kubellm", "--set", "sources.raw=s3://b/raw/",
                  "--set", "sources.chat=s3://b/chat.jsonl", "--set", "sources.preferences=s3://b/prefs.jsonl")


def isolate_kfp_env(monkeypatch: Any, tmp_path_factory: Any) -> None:
    """No KFP endpoint, credentials, image or S3 settings from the machine running the tests: no
    environment variables, no ~/.config/kfp/context.json, no ServiceAccount token at kfp's default path."""
    from kubellm.pipelines import kfp_api

    for k in ("KUBELLM_KFP_TOKEN", "KUBELLM_KFP_COOKIE", "KUBELLM_KFP_ENDPOINT", "KF_PIPELINES_ENDPOINT",
              "KF_PIPELINES_SA_TOKEN_PATH", "KUBELLM_REGISTRY", "KUBELLM_TAG", "KUBELLM_S3_SECRET_NAME",
              "KUBELLM_S3_CONFIG_MAP"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setattr(kfp_api, "SA_TOKEN_DEFAULT_PATH", str(tmp_path_factory.mktemp("none") / "token"),
                        raising=False)


API = "/apis/v2beta1"


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


def _match_filter(items: list[dict[str, Any]], filt: str | None) -> list[dict[str, Any]]:
    if not filt:
        return items
    preds = json.loads(filt).get("predicates", [])
    out = items
    for p in preds:
        op = p.get("operation") or p.get("op")
        if op not in ("EQUALS", 1):
            raise ValueError(f"fake KFP: filter operation {op!r} not supported")
        val = p.get("stringValue", p.get("string_value"))
        out = [i for i in out if i.get(p["key"]) == val]
    return out


class FakeKfp:
    def __init__(self, token: str | None = None, cookie: str | None = None, multi_user: bool = False,
                 run_states: list[str] | None = None) -> None:
        self.token, self.cookie, self.multi_user = token, cookie, multi_user
        self.run_states = list(run_states or ["RUNNING", "SUCCEEDED"])
        self.requests: list[Request] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.run_gets: dict[str, int] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        self.run_error: str = "task 'pretrain' failed: NotImplementedStageError"
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKfp:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ helpers for tests
    def calls(self, method: str, pattern: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.fullmatch(API + pattern, r.path)]

    def authorized(self, headers: dict[str, str]) -> bool:
        if self.token is None and self.cookie is None:
            return True
        if self.token is not None and headers.get("authorization") == f"Bearer {self.token}":
            return True
        return self.cookie is not None and self.cookie in headers.get("cookie", "")

    # ------------------------------------------------------------------ the API
    def handle(self, method: str, path: str, q: dict[str, str], body: bytes) -> tuple[int, Any]:
        seg = path[len(API):].strip("/").split("/") if path.startswith(API) else []
        if not seg:
            return 404, {"message": f"no route {path}"}
        kind = seg[0]
        if kind == "healthz" and method == "GET":
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
        if kind == "experiments":
            return self._experiments(method, seg, q, body)
        if kind == "pipelines":
            return self._pipelines(method, seg, q, body)
        if kind == "runs":
            return self._runs(method, seg, q, body)
        if kind == "recurringruns":
            return self._recurring(method, seg, q, body)
        return 404, {"message": f"no route {method} {path}"}

    def _experiments(self, method: str, seg: list[str], q: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "POST" and len(seg) == 1:
            e = json.loads(body)
            e["experiment_id"] = str(uuid.uuid4())
            self.experiments[e["experiment_id"]] = e
            return 200, e
        if method == "GET" and len(seg) == 1:
            items = [e for e in self.experiments.values()
                     if not q.get("namespace") or e.get("namespace") == q["namespace"]]
            return 200, {"experiments": _match_filter(items, q.get("filter")), "total_size": len(items)}
        if method == "GET" and len(seg) == 2 and seg[1] in self.experiments:
            return 200, self.experiments[seg[1]]
        return 404, {"message": "experiment not found"}

    def _pipelines(self, method: str, seg: list[str], q: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "POST" and seg[1:] == ["upload"]:
            if any(p["display_name"] == q.get("name") for p in self.pipelines.values()):
                return 409, {"message": f"pipeline {q.get('name')} already exists"}
            p = {"pipeline_id": str(uuid.uuid4()), "display_name": q.get("name"), "description": q.get("description"),
                 "namespace": q.get("namespace")}
            self.pipelines[p["pipeline_id"]] = p
            self._add_version(p["pipeline_id"], q.get("name", ""), "")
            return 200, p
        if method == "POST" and seg[1:] == ["upload_version"]:
            pid = q.get("pipelineid", "")
            if pid not in self.pipelines:
                return 404, {"message": f"pipeline {pid} not found"}
            if any(v["pipeline_id"] == pid and v["display_name"] == q.get("name") for v in self.versions.values()):
                return 409, {"message": f"Failed to create a pipeline version: version {q.get('name')} already exists"}
            return 200, self._add_version(pid, q.get("name", ""), q.get("description", ""))
        if method == "GET" and len(seg) == 1:
            items = list(self.pipelines.values())
            return 200, {"pipelines": _match_filter(items, q.get("filter")), "total_size": len(items)}
        if method == "GET" and len(seg) == 3 and seg[2] == "versions":
            items = [v for v in self.versions.values() if v["pipeline_id"] == seg[1]]
            return 200, {"pipeline_versions": _match_filter(items, q.get("filter")), "total_size": len(items)}
        if method == "GET" and len(seg) == 4 and seg[3] in self.versions:
            return 200, self.versions[seg[3]]
        if method == "GET" and len(seg) == 2 and seg[1] in self.pipelines:
            return 200, self.pipelines[seg[1]]
        return 404, {"message": "pipeline route not found"}

    def _add_version(self, pid: str, name: str, description: str) -> dict[str, Any]:
        v = {"pipeline_id": pid, "pipeline_version_id": str(uuid.uuid4()), "display_name": name,
             "description": description}
        self.versions[v["pipeline_version_id"]] = v
        return v

    def _runs(self, method: str, seg: list[str], q: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "POST" and len(seg) == 1:
            r = json.loads(body)
            if not r.get("pipeline_spec") and not r.get("pipeline_version_reference"):
                return 400, {"message": "a run needs a pipeline spec or a pipeline version reference"}
            ref = r.get("pipeline_version_reference") or {}
            if ref and ref.get("pipeline_version_id") not in self.versions:
                return 404, {"message": "pipeline version not found"}
            r.update(run_id=str(uuid.uuid4()), state="PENDING", created_at="2026-01-01T00:00:00Z")
            self.runs[r["run_id"]] = r
            return 200, r
        if method == "GET" and len(seg) == 1:
            items = [r for r in self.runs.values()
                     if not q.get("experiment_id") or r.get("experiment_id") == q["experiment_id"]]
            return 200, {"runs": _match_filter(items, q.get("filter")), "total_size": len(items)}
        if method == "GET" and len(seg) == 2 and seg[1] in self.runs:
            r = self.runs[seg[1]]
            n = self.run_gets.get(seg[1], 0)
            self.run_gets[seg[1]] = n + 1
            r["state"] = self.run_states[min(n, len(self.run_states) - 1)]
            if r["state"] == "FAILED":
                r["error"] = {"code": 2, "message": self.run_error}
            return 200, r
        return 404, {"message": "run not found"}

    def _recurring(self, method: str, seg: list[str], q: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "POST" and len(seg) == 1:
            r = json.loads(body)
            r.update(recurring_run_id=str(uuid.uuid4()), status="ENABLED" if r.get("mode") == "ENABLE" else "DISABLED")
            self.recurring[r["recurring_run_id"]] = r
            return 200, r
        if method == "GET" and len(seg) == 1:
            items = [r for r in self.recurring.values()
                     if not q.get("experiment_id") or r.get("experiment_id") == q["experiment_id"]]
            return 200, {"recurringRuns": _match_filter(items, q.get("filter")), "total_size": len(items)}
        rid, _, action = seg[1].partition(":") if len(seg) == 2 else ("", "", "")
        if rid not in self.recurring:
            return 404, {"message": f"recurring run {rid} not found"}
        if method == "GET" and not action:
            return 200, self.recurring[rid]
        if method == "DELETE" and not action:
            del self.recurring[rid]
            return 200, {}
        if method == "POST" and action in ("enable", "disable"):
            self.recurring[rid]["mode"] = action.upper()
            return 200, {}
        return 404, {"message": "recurring run route not found"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def _serve(self, method: str) -> None:
                u = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(u.query).items()}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with fake.lock:
                    fake.requests.append(Request(method, u.path, q, headers, body))
                    if not fake.authorized(headers):
                        status, payload = 401, {"message": "Unauthorized: missing or invalid credentials"}
                    else:
                        status, payload = fake.handle(method, u.path, q, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler
