"""A fake Kubernetes API server over HTTP on 127.0.0.1 for launcher tests (no cluster needed).

It serves what the launcher uses, with the real paths and JSON shapes:
  GET    /apis/kubeflow.org/v1                                     discovery (404 = operator missing)
  POST   /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs          create (409 if it exists; 422 if the
                                                                    operator's admission rules refuse it)
  GET    .../pytorchjobs, .../pytorchjobs/{name}[/status]           list / get
  DELETE .../pytorchjobs/{name}                                     delete (gone after `delete_delay` gets)
  PATCH  .../pytorchjobs/{name}                                     JSON merge patch of metadata (409 on a
                                                                    stale metadata.resourceVersion)
  GET    /api/v1/namespaces/{ns}/pods?labelSelector=...             pods the "operator" made
  GET    /api/v1/namespaces/{ns}/pods/{pod}/log                     log lines (with timestamps)
  GET    /api/v1/namespaces/{ns}/events?fieldSelector=...           events

Status is scripted: `fake.script(name, [step, ...])` queues one script per creation of that job; each
GET of the job advances one step (deterministic, no wall clock). A step is a phase name or a dict
{"phase", "reason", "message", "exit_code", "termination_message", "waiting": (reason, message),
"log": [lines], "event": (reason, message),
"unschedulable": message (pods Pending with PodScheduled=False), "no_pods": True (the operator could not
create any pod: none is listed)}. Faults: `fake.inject("GET", "/pytorchjobs/", 500, times=2)`.

    with FakeKubeApi() as fake:
        fake.script("job-a", ["Created", "Running", "Succeeded"])
        run_appdef(app, ..., settings={"api_host": fake.url, ...})
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?(/status)?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")
DEFAULT_SCRIPT = ["Created", "Running", "Succeeded"]


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


class FakeKubeApi:
    def __init__(self, crd_installed: bool = True, admission: Callable[[dict[str, Any]], list[str]] | None = None,
                 delete_delay: int = 1) -> None:
        self.crd_installed = crd_installed
        self.admission = admission
        self.delete_delay = delete_delay
        self.namespaces: set[str] | None = None
        """When set, the namespaces that exist (job requests elsewhere answer 404 namespaces not found)."""
        self.lock = threading.RLock()
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.scripts: dict[str, list[list[Any]]] = defaultdict(list)
        self._cursor: dict[str, int] = {}
        self._active: dict[str, list[Any]] = {}
        self._deleting: dict[str, int] = {}
        self.pod_state: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, list[str]] = defaultdict(list)
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        self.deletes: list[str] = []
        self.patches: list[tuple[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self._clock = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # --- test API ---
    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, name: str, steps: list[Any]) -> None:
        """Queue the status script of the next creation of job `name`."""
        with self.lock:
            self.scripts[name].append(list(steps))

    def inject(self, method: str, path_part: str, status: int, times: int = 1, retry_after: float | None = None,
               message: str = "injected fault") -> None:
        """The next `times` requests whose method matches and whose path contains `path_part` fail with `status`
        (a Status body carrying `message`)."""
        with self.lock:
            self.faults.append({"method": method, "part": path_part, "status": status, "times": times,
                                "retry_after": retry_after, "message": message})

    def preload(self, job: dict[str, Any], steps: list[Any]) -> None:
        """Put an existing job (from an 'earlier attempt') in place, at the first step of `steps`."""
        with self.lock:
            self._store(job, steps)
            self._advance(job["metadata"]["name"])

    def count(self, method: str, part: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and part in p)

    def job(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        with self.lock:
            return self.jobs.get((namespace, name))

    # --- state machine ---
    def _store(self, job: dict[str, Any], steps: list[Any]) -> dict[str, Any]:
        meta = job.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = "1"
        meta["creationTimestamp"] = "2026-01-01T00:00:00Z"
        job["status"] = {}
        name = meta["name"]
        self.jobs[(meta["namespace"], name)] = job
        self._active[name] = steps
        self._cursor[name] = -1
        for pod in self._pod_names(job):
            self.pod_state[pod] = {"phase": "Pending"}
            self.logs[pod] = []
        return job

    def _pod_names(self, job: dict[str, Any]) -> list[str]:
        name = job["metadata"]["name"]
        out = []
        for rtype, rspec in (job.get("spec", {}).get("pytorchReplicaSpecs") or {}).items():
            out += [f"{name}-{rtype.lower()}-{i}" for i in range(int(rspec.get("replicas", 1)))]
        return out

    def _advance(self, name: str) -> None:
        steps = self._active.get(name) or DEFAULT_SCRIPT
        cur = min(self._cursor.get(name, -1) + 1, len(steps) - 1)
        if cur == self._cursor.get(name):
            return  # the last step holds
        self._cursor[name] = cur
        step = steps[cur]
        step = {"phase": step} if isinstance(step, str) else dict(step)
        job = next(j for (_, n), j in self.jobs.items() if n == name)
        phase = step["phase"]
        self._clock += 1
        conds = job["status"].setdefault("conditions", [])
        if phase == "Running":
            for c in conds:
                if c["type"] == "Restarting":
                    c["status"] = "False"
        if phase == "Restarting":
            for c in conds:
                if c["type"] == "Running":
                    c["status"] = "False"
        if phase in ("Succeeded", "Failed"):
            for c in conds:
                if c["type"] == "Running":
                    c["status"] = "False"
        conds.append({"type": phase, "status": "True", "reason": step.get("reason", f"PyTorchJob{phase}"),
                      "message": step.get("message", f"PyTorchJob {name} is {phase.lower()}."),
                      "lastTransitionTime": f"2026-01-01T00:00:{self._clock:02d}Z"})
        pod_phase = {"Created": "Pending", "Running": "Running", "Restarting": "Running",
                     "Succeeded": "Succeeded", "Failed": "Failed"}.get(phase, "Pending")
        for pod in self._pod_names(job):
            st: dict[str, Any] = {"phase": pod_phase}
            if "waiting" in step:
                st = {"phase": "Pending", "waiting": step["waiting"]}
            if "unschedulable" in step:
                st = {"phase": "Pending", "unschedulable": step["unschedulable"]}
            if step.get("no_pods"):
                st = {"phase": "Pending", "absent": True}
            if "exit_code" in step and pod.endswith("-0") and (phase == "Failed"):
                st["terminated"] = {"exitCode": step["exit_code"], "reason": "Error",
                                    "message": step.get("termination_message", "")}
            self.pod_state[pod] = st
        for line in step.get("log", []):
            rank0 = self._pod_names(job)[0]
            self.logs[rank0].append(f"2026-01-01T00:00:00.{len(self.logs[rank0]):09d}Z {line}")
        if "event" in step:
            reason, message = step["event"]
            self.events.append({"type": "Warning", "reason": reason, "message": message,
                                "involvedObject": {"kind": "PyTorchJob", "name": name}})

    def _pod(self, ns: str, job: dict[str, Any], pod: str) -> dict[str, Any]:
        st = self.pod_state.get(pod, {"phase": "Pending"})
        rtype, idx = pod.rsplit("-", 2)[-2:]
        cstatus: dict[str, Any] = {"name": "pytorch", "ready": st["phase"] == "Running", "restartCount": 0}
        if "waiting" in st:
            cstatus["state"] = {"waiting": {"reason": st["waiting"][0], "message": st["waiting"][1]}}
        elif "terminated" in st:
            cstatus["state"] = {"terminated": st["terminated"]}
        elif st["phase"] == "Running":
            cstatus["state"] = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        else:
            cstatus["state"] = {"waiting": {"reason": "ContainerCreating"}}
        pstatus: dict[str, Any] = {"phase": st["phase"], "containerStatuses": [cstatus]}
        if "unschedulable" in st:
            pstatus["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                      "message": st["unschedulable"]}]
            del pstatus["containerStatuses"]
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": ns, "labels": {
                    "training.kubeflow.org/job-name": job["metadata"]["name"],
                    "training.kubeflow.org/replica-type": rtype, "training.kubeflow.org/replica-index": idx}},
                "status": pstatus}

    # --- HTTP ---
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any, ctype: str = "application/json", headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else (json.dumps(body).encode() if ctype == "application/json"
                                                             else str(body).encode())
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
                with fake.lock:
                    fake.requests.append((method, url.path))
                    for f in fake.faults:
                        if f["times"] > 0 and f["method"] == method and f["part"] in url.path:
                            f["times"] -= 1
                            hdr = {"Retry-After": str(f["retry_after"])} if f["retry_after"] is not None else {}
                            return self._send(f["status"], _status(f["status"], "InternalError", f["message"]),
                                              headers=hdr)
                    code, out, ctype = fake._route(method, url.path, q, body)
                self._send(code, out, ctype)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

        return Handler

    def _route(self, method: str, path: str, q: dict[str, str], body: Any) -> tuple[int, Any, str]:
        js = "application/json"
        if path in ("/apis/kubeflow.org/v1", "/apis/kubeflow.org/v1/"):
            if not self.crd_installed:
                return 404, "404 page not found\n", "text/plain"
            return 200, {"kind": "APIResourceList", "groupVersion": "kubeflow.org/v1", "resources": [
                {"name": "pytorchjobs", "namespaced": True, "kind": "PyTorchJob",
                 "verbs": ["create", "delete", "get", "list", "patch", "watch"]},
                {"name": "pytorchjobs/status", "namespaced": True, "kind": "PyTorchJob", "verbs": ["get"]}]}, js
        m = JOBS.match(path)
        if m:
            if not self.crd_installed:
                return 404, "404 page not found\n", "text/plain"
            ns, name, _ = m.groups()
            if self.namespaces is not None and ns not in self.namespaces:
                return 404, _status(404, "NotFound", f'namespaces "{ns}" not found',
                                    {"name": ns, "kind": "namespaces"}), js
            if name is None and method == "GET":
                items = [j for (n, _), j in self.jobs.items() if n == ns]
                return 200, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJobList", "items": items}, js
            if name is None and method == "POST":
                jname = body["metadata"]["name"]
                if (ns, jname) in self.jobs:
                    return 409, _status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{jname}" already exists',
                                        {"name": jname, "group": "kubeflow.org", "kind": "pytorchjobs"}), js
                problems = self.admission(body) if self.admission else []
                if problems:
                    return 422, _status(422, "Invalid", "; ".join(problems)), js
                self.created.append(json.loads(json.dumps(body)))
                queued = self.scripts.get(jname) or []
                steps = queued.pop(0) if queued else DEFAULT_SCRIPT
                job = self._store(json.loads(json.dumps(body)), steps)
                return 201, job, js
            job = self.jobs.get((ns, name))
            if job is None:
                return 404, _status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found',
                                    {"name": name, "group": "kubeflow.org", "kind": "pytorchjobs"}), js
            if method == "GET":
                if name in self._deleting:
                    self._deleting[name] -= 1
                    if self._deleting[name] < 0:
                        del self._deleting[name]
                        del self.jobs[(ns, name)]
                        return 404, _status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found'), js
                else:
                    self._advance(name)
                return 200, job, js
            if method == "PATCH":
                self.patches.append((name, json.loads(json.dumps(body))))
                meta = (body or {}).get("metadata") or {}
                want = meta.get("resourceVersion")
                if want is not None and want != job["metadata"]["resourceVersion"]:
                    return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on pytorchjobs.kubeflow.org '
                                        f'"{name}": the object has been modified'), js
                for key, value in meta.items():
                    if key != "resourceVersion":
                        job["metadata"][key] = value
                job["metadata"]["resourceVersion"] = str(int(job["metadata"]["resourceVersion"]) + 1)
                return 200, job, js
            if method == "DELETE":
                self.deletes.append(name)
                if name not in self._deleting:
                    job["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
                    self._deleting[name] = self.delete_delay
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                             "details": {"name": name, "kind": "pytorchjobs", "uid": job["metadata"]["uid"]}}, js
            return 405, _status(405, "MethodNotAllowed", method), js
        m = PODS.match(path)
        if m:
            ns = m.group(1)
            sel = dict(kv.split("=", 1) for kv in q.get("labelSelector", "").split(",") if "=" in kv)
            items = []
            for (jns, _), job in self.jobs.items():
                if jns != ns:
                    continue
                for pod in self._pod_names(job):
                    if self.pod_state.get(pod, {}).get("absent"):
                        continue
                    p = self._pod(ns, job, pod)
                    if all(p["metadata"]["labels"].get(k) == v for k, v in sel.items()):
                        items.append(p)
            return 200, {"apiVersion": "v1", "kind": "PodList", "items": items}, js
        m = LOG.match(path)
        if m:
            pod = m.group(2)
            st = self.pod_state.get(pod)
            if st is None or st.get("absent"):
                return 404, _status(404, "NotFound", f'pods "{pod}" not found'), js
            if st["phase"] == "Pending":
                return 400, _status(400, "BadRequest", f'container "pytorch" in pod "{pod}" is waiting to start'), js
            lines = self.logs[pod] if q.get("timestamps", "").lower() == "true" else [ln.split(" ", 1)[1] for ln in self.logs[pod]]
            return 200, "".join(ln + "\n" for ln in lines), "text/plain"
        m = EVENTS.match(path)
        if m:
            sel = q.get("fieldSelector", "")
            want = sel.split("=", 1)[1] if sel.startswith("involvedObject.name=") else None
            items = [e for e in self.events if want is None or e["involvedObject"]["name"] == want]
            return 200, {"apiVersion": "v1", "kind": "EventList", "items": items}, js
        return 404, "404 page not found\n", "text/plain"
