"""Run a TorchX `AppDef` as a Kubernetes training job and wait for it: idempotent, cancellable, resuming.

From a KFP component (the pod has the downward-API env KUBELLM_POD_NAME/KUBELLM_POD_UID):

    from kubellm.training.pytorchjob import run_appdef
    result = run_appdef(appdef, namespace=None, run_id="{{$.pipeline_job_uuid}}", task_name="pretrain",
                        settings={"s3_secret_name": "kubellm-s3", "node_gpus": 8})

Lifecycle (the job name is derived from run ID + task, so every attempt of one KFP task finds the same job):
  * no job            -> create it (409 = a concurrent attempt created it -> attach);
  * job running       -> re-attach (a KFP retry never creates a second job) and add this launcher's
                         pod to the job's ownerReferences, so the garbage collector does not delete
                         the job with the earlier attempt's pod (same namespace only);
  * job of another run, or live/Succeeded with a different spec-hash -> refuse (never attach to,
                         delete or report the success of a job this attempt would not have created);
  * job Succeeded     -> report success;
  * job Failed        -> delete it, wait until it is gone, create it again (same args, same run
                         prefix: training resumes from the last committed checkpoint);
  * while waiting     -> report phase transitions, stream rank 0's log, fail fast on pods stuck in
                         CreateContainerConfigError/ImagePullBackOff or pods the operator cannot create
                         (FailedCreatePod events: quota, missing ServiceAccount/PriorityClass, Pod
                         Security) for settings.config_error_grace_s, time out (with the scheduler's
                         reason) on pods unschedulable for settings.unschedulable_timeout_s, and on SIGTERM/SIGINT (pipeline
                         cancel) delete the job exactly once and raise LaunchCancelledError.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubellm.core.config import validate
from kubellm.core.errors import KubellmError
from kubellm.training.pytorchjob import translate
from kubellm.training.pytorchjob.backend import (
    CONFIG_ERRORS,
    FAILED,
    POD_CREATE_ERRORS,
    PULL_ERRORS,
    SUCCEEDED,
    TERMINAL,
    JobConflictError,
    JobExistsError,
    JobStatus,
    LaunchBackend,
    backend_for,
    stuck_reasons,
)
from kubellm.training.pytorchjob.kube import KubeApi, KubeApiError, default_namespace
from kubellm.training.pytorchjob.settings import ClusterLaunchSettings

log = logging.getLogger(__name__)
ATTEMPT_ANNOTATION = f"{translate.LABEL_PREFIX}/attempt"


class JobFailedError(KubellmError):
    """The training job failed; the message carries the operator's reason, failed containers'
    exit codes and termination messages, and Warning events."""

    def __init__(self, message: str, result: LaunchResult) -> None:
        super().__init__(message)
        self.result = result


class LaunchCancelledError(KubellmError):
    """The launcher was told to stop (SIGTERM/SIGINT: pipeline cancel); the job was deleted."""


@dataclass
class LaunchResult:
    name: str
    namespace: str
    kind: str
    phase: str = ""
    uid: str = ""
    attempt: int = 1
    created: bool = False
    """This call created the job (at least once)."""
    reattached: bool = False
    """This call found a live job of an earlier attempt and attached to it."""
    recreated: int = 0
    """Failed jobs this call deleted and created again."""
    transitions: list[str] = field(default_factory=list)
    failure: str | None = None


class _LogStreamer(threading.Thread):
    """Follows one container's log, reconnecting when the stream ends (container restart, API
    timeout); lines already shown are skipped by their API timestamp."""

    def __init__(self, backend: LaunchBackend, pod: str, container: str, sink: Callable[[str], None], interval: float):
        super().__init__(name=f"logs-{pod}", daemon=True)
        self.backend, self.pod, self.container, self.sink, self.interval = backend, pod, container, sink, interval
        self.stop = threading.Event()
        self._last_ts = ""
        self._seen_at_last: set[str] = set()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            self.read(follow=True)
            self.stop.wait(self.interval)

    def read(self, follow: bool) -> None:
        api = self.backend.api
        try:
            resp = api.call(
                f"logs of {self.pod}", api.core.read_namespaced_pod_log, self.pod, self.backend.namespace,
                container=self.container, follow=follow, timestamps=True, raw=True,
                _request_timeout=(api.timeout_s, None if follow else api.timeout_s),
            )
        except (ApiException, KubellmError):  # container not started yet, pod gone: try again later
            return
        buf = b""
        try:
            for chunk in resp.stream(4096):
                if self.stop.is_set() and follow:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw_line in lines:
                    self._emit(raw_line.decode(errors="replace"))
            if buf:
                self._emit(buf.decode(errors="replace"))
        except Exception:  # noqa: BLE001 — a broken stream just reconnects
            pass
        finally:
            resp.release_conn()

    def _emit(self, line: str) -> None:
        ts, _, text = line.partition(" ")
        with self._lock:
            if ts < self._last_ts or (ts == self._last_ts and text in self._seen_at_last):
                return
            if ts != self._last_ts:
                self._last_ts, self._seen_at_last = ts, set()
            self._seen_at_last.add(text)
        self.sink(f"[{self.pod}] {text}")


class JobLauncher:
    """The idempotent job lifecycle over one `LaunchBackend` (see the module docstring)."""

    def __init__(
        self,
        backend: LaunchBackend,
        settings: ClusterLaunchSettings,
        sink: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        before_create: Callable[[], None] | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.sink = sink or (lambda line: print(line, flush=True))
        self.clock = clock
        self.before_create = before_create
        """Called right before each job creation (never when attaching to an existing job), e.g. to clear
        a previous attempt's result files: a job re-attached to keeps what it wrote."""
        self._cancel = threading.Event()
        self._deleted: set[str] = set()
        self._delete_lock = threading.Lock()

    # --- public ---
    def launch(self, appdef: Any, ctx: translate.JobContext, name: str) -> LaunchResult:
        b = self.backend
        # Build (and so validate) before any request: bad input fails with no side effect.
        obj = b.build(appdef, name, ctx)
        b.check_installed()
        result = LaunchResult(name=name, namespace=b.namespace, kind=b.kind)
        with self._signals():
            job = self._ensure(obj, appdef, ctx, result)
            while True:
                st = self._wait(job, result)
                if st.phase == SUCCEEDED:
                    self._say(f"{b.kind} {b.namespace}/{name} succeeded")
                    return result
                details = "\n".join(b.failure_details(job_or(b.get(name), job)))
                result.failure = details
                if result.recreated < self.settings.recreate_on_failure:
                    self._say(f"{b.kind} {b.namespace}/{name} failed; recreating it "
                              f"({result.recreated + 1}/{self.settings.recreate_on_failure}), "
                              f"training resumes from the last committed checkpoint:\n{details}")
                    job = self._recreate(name, appdef, ctx, result)
                    continue
                raise JobFailedError(f"training job failed:\n{details}", result)

    def cancel(self) -> None:
        """Ask the wait loop to delete the job and stop (what the SIGTERM handler does)."""
        self._cancel.set()

    # --- lifecycle ---
    def _ensure(self, obj: dict[str, Any], appdef: Any, ctx: translate.JobContext, result: LaunchResult) -> dict[str, Any]:
        b, name = self.backend, obj["metadata"]["name"]
        for _ in range(5):  # create/409/get races settle in one or two rounds
            self._check_cancel(name)
            existing = b.get(name)
            if existing is None:
                if self.before_create is not None:
                    self.before_create()
                try:
                    job = b.create(obj)
                except JobExistsError:
                    self._say(f"{b.kind} {b.namespace}/{name} was created concurrently; attaching to it")
                    continue
                result.created = True
                self._note_job(job, result)
                self._say(f"created {b.kind} {b.namespace}/{name} (attempt {result.attempt})")
                return job
            st = b.status(existing)
            prev_attempt = _attempt(existing)
            if not st.deleting:
                self._check_same_job(obj, existing, st)
            if st.deleting:
                self._say(f"{b.kind} {b.namespace}/{name} is being deleted; waiting to create it again")
                self._wait_gone(name)
                obj = self._rebuild(appdef, ctx, name, prev_attempt + 1)
                continue
            if st.phase == FAILED:
                details = "\n".join(b.failure_details(existing))
                self._say(f"{b.kind} {b.namespace}/{name} from attempt {prev_attempt} failed:\n{details}\n"
                          "deleting it and creating it again; training resumes from the last committed checkpoint")
                self._delete_and_wait(name)
                result.recreated += 1
                obj = self._rebuild(appdef, ctx, name, prev_attempt + 1)
                continue
            result.reattached = True
            self._note_job(existing, result)
            self._say(f"re-attached to existing {b.kind} {b.namespace}/{name} (attempt {result.attempt}, {st.describe()})")
            if st.phase not in TERMINAL:
                existing = self._take_ownership(existing, ctx)
            return existing
        raise KubellmError(f"{b.kind} {b.namespace}/{name}: could not create or attach after repeated conflicts")

    def _check_same_job(self, obj: Mapping[str, Any], existing: Mapping[str, Any], st: JobStatus) -> None:
        """Refuse to attach to (or delete, or report the success of) a job with this name that another
        run created, or that runs a different spec than this attempt would create. A Failed job of this
        same run is ours to recreate even when its spec differs."""
        b, name = self.backend, obj["metadata"]["name"]
        mine = obj["metadata"].get("annotations") or {}
        theirs = existing.get("metadata", {}).get("annotations") or {}
        run_key, hash_key = f"{translate.LABEL_PREFIX}/run-id", f"{translate.LABEL_PREFIX}/spec-hash"
        what = f"{b.kind} {b.namespace}/{name}"
        if run_key not in theirs:
            raise KubellmError(
                f"{what} exists but was not created by kubellm (no {run_key} annotation); refusing to attach to, "
                "delete or report it; delete it or set settings.job_name to another name"
            )
        if theirs.get(run_key) != mine.get(run_key):
            raise KubellmError(
                f"{what} belongs to another run ({run_key}={theirs.get(run_key)!r}, this run is "
                f"{mine.get(run_key)!r}); refusing to attach to, delete or report it; set settings.job_name "
                "to another name"
            )
        if st.phase != FAILED and hash_key in theirs and theirs.get(hash_key) != mine.get(hash_key):
            raise KubellmError(
                f"{what} ({st.describe()}) runs a different spec than this attempt would create (spec-hash "
                f"{theirs.get(hash_key)} != {mine.get(hash_key)}: the image, command, resources or settings "
                "changed); refusing to attach to it. Delete the job to start again with the new spec"
            )

    def _take_ownership(self, job: dict[str, Any], ctx: translate.JobContext) -> dict[str, Any]:
        """Add this launcher's pod to the re-attached job's ownerReferences (a non-controller owner, as
        at creation): when the earlier attempt's pod is garbage-collected the job then still has an
        owner and is not deleted under this attempt. Idempotent; the earlier owners are kept."""
        b, name = self.backend, job["metadata"]["name"]
        ref = ctx.owner_reference(b.namespace)
        if ref is None:
            return job
        for _ in range(5):
            refs = list(job.get("metadata", {}).get("ownerReferences") or [])
            if any(r.get("uid") == ref["uid"] for r in refs):
                return job
            try:
                patched = b.set_owner_references(name, [*refs, ref], job.get("metadata", {}).get("resourceVersion"))
            except JobConflictError:
                current = b.get(name)
                if current is None:
                    return job  # gone: the wait loop reports it
                job = current
                continue
            except KubeApiError as e:
                hint = (" (the launcher Role needs `patch` on pytorchjobs: upgrade the kubellm chart)"
                        if e.status == 403 else "")
                self._say(f"warning: could not add pod {ref['name']} as an owner of {b.kind} {b.namespace}/{name} "
                          f"({e}): the job is garbage-collected when the earlier attempt's pod is{hint}")
                return job
            if patched is None:
                return job
            self._say(f"added pod {ref['name']} as an owner of {b.kind} {b.namespace}/{name}")
            return patched
        return job

    def _recreate(self, name: str, appdef: Any, ctx: translate.JobContext, result: LaunchResult) -> dict[str, Any]:
        self._delete_and_wait(name)
        result.recreated += 1
        obj = self._rebuild(appdef, ctx, name, result.attempt + 1)
        return self._ensure(obj, appdef, ctx, result)

    def _rebuild(self, appdef: Any, ctx: translate.JobContext, name: str, attempt: int) -> dict[str, Any]:
        ctx = dataclasses.replace(ctx, attempt=attempt)
        return self.backend.build(appdef, name, ctx)

    def _note_job(self, job: Mapping[str, Any], result: LaunchResult) -> None:
        result.uid = job.get("metadata", {}).get("uid", "")
        result.attempt = _attempt(job)

    def _wait(self, job: Mapping[str, Any], result: LaunchResult) -> JobStatus:
        b, s = self.backend, self.settings
        name = job["metadata"]["name"]
        uid = job.get("metadata", {}).get("uid")
        last = ""
        stuck_since: dict[tuple[str, str], float] = {}
        streamer: _LogStreamer | None = None
        try:
            while True:
                self._check_cancel(name)
                cur = b.get(name)
                if cur is None or (uid and cur.get("metadata", {}).get("uid") not in (None, uid)):
                    st = JobStatus(FAILED, "JobDeleted", "the job was deleted by someone else (or its TTL) while running")
                    result.phase = st.phase
                    raise JobFailedError(f"{b.kind} {b.namespace}/{name}: {st.describe()}", result)
                st = b.status(cur)
                if st.phase != last:
                    msg = f"{b.kind} {b.namespace}/{name}: {last or 'new'} -> {st.describe()}"
                    result.transitions.append(st.phase)
                    self._say(msg)
                    last = st.phase
                result.phase = st.phase
                if st.phase in TERMINAL:
                    if streamer is not None:
                        streamer.stop.set()
                        streamer.join(timeout=s.request_timeout_s)
                        streamer.read(follow=False)  # the tail the follow stream may have missed
                    return st
                pods = b.pods(name)
                if s.stream_logs and streamer is None:
                    pod_name, container = b.log_pod(cur)
                    if any(p.get("metadata", {}).get("name") == pod_name and
                           (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for p in pods):
                        streamer = _LogStreamer(b, pod_name, container, self.sink, s.poll_interval_s)
                        streamer.start()
                self._check_stuck(name, cur, pods, stuck_since, result)
                self._cancel.wait(s.poll_interval_s)
        finally:
            if streamer is not None:
                streamer.stop.set()

    def _check_stuck(self, name: str, job: Mapping[str, Any], pods: list[dict[str, Any]],
                     since: dict[tuple[str, str], float], result: LaunchResult) -> None:
        now = self.clock()
        current = set()
        for pod in pods:
            for reason, _msg in stuck_reasons(pod):
                key = (pod.get("metadata", {}).get("name", ""), reason)
                current.add(key)
                since.setdefault(key, now)
                grace = self.settings.config_error_grace_s if reason in CONFIG_ERRORS else self.settings.image_pull_grace_s
                if reason in CONFIG_ERRORS | PULL_ERRORS and now - since[key] >= grace:
                    self._give_up(name, job, pods, result, f"pod {key[0]} stuck in {reason} for {now - since[key]:.0f}s",
                                  "training job cannot start (a missing Secret/ConfigMap or image?)")
        timeout = self.settings.unschedulable_timeout_s
        for pod in pods:
            for cond in (pod.get("status") or {}).get("conditions") or []:
                if cond.get("type") != "PodScheduled" or cond.get("status") != "False":
                    continue
                key = (pod.get("metadata", {}).get("name", ""), "Unschedulable")
                current.add(key)
                since.setdefault(key, now)
                if timeout is not None and now - since[key] >= timeout:
                    self._give_up(name, job, pods, result, f"pod {key[0]} unschedulable for {now - since[key]:.0f}s",
                                  f"training job cannot be scheduled within settings.unschedulable_timeout_s="
                                  f"{timeout:.0f}s (no node fits its resources, node selector or tolerations?)")
        self._check_missing_pods(name, job, pods, since, current, result, now)
        for key in set(since) - current:
            del since[key]

    def _check_missing_pods(self, name: str, job: Mapping[str, Any], pods: list[dict[str, Any]],
                            since: dict[tuple[str, str], float], current: set[tuple[str, str]],
                            result: LaunchResult, now: float) -> None:
        """Fewer pods than replicas and the operator's Warning events say the API server refused them
        (quota, a missing ServiceAccount or PriorityClass, Pod Security): no pod status will ever show
        it, so fail after settings.config_error_grace_s, naming the event's message."""
        b = self.backend
        expected = b.expected_pods(job)
        if len(pods) >= expected:
            return
        uid = job.get("metadata", {}).get("uid")
        refused = [
            ev for ev in b.events([name])
            if ev.get("type") == "Warning" and ev.get("reason") in POD_CREATE_ERRORS
            and (ev.get("involvedObject") or {}).get("kind", b.kind) == b.kind
            # the same name may have belonged to an earlier (deleted) job: only this one's events
            and (not uid or (ev.get("involvedObject") or {}).get("uid", uid) == uid)
        ]
        if not refused:
            return
        key = (name, "FailedCreatePod")
        current.add(key)
        since.setdefault(key, now)
        grace = self.settings.config_error_grace_s
        if now - since[key] >= grace:
            ev = max(enumerate(refused), key=lambda ie: (_event_time(ie[1]), ie[0]))[1]
            self._give_up(
                name, job, pods, result,
                f"{len(pods)}/{expected} pods exist; the operator cannot create the others "
                f"for {now - since[key]:.0f}s",
                f"training job cannot create its pods (settings.config_error_grace_s={grace:.0f}s): "
                f"{ev.get('reason')}: {ev.get('message', '')}",
            )

    def _give_up(self, name: str, job: Mapping[str, Any], pods: list[dict[str, Any]], result: LaunchResult,
                 what: str, why: str) -> None:
        """A pod will not start: record the failure details, delete the job, raise JobFailedError."""
        details = "\n".join(self.backend.failure_details(job, pods))
        result.failure = details
        result.phase = FAILED
        self._say(f"{self.backend.kind} {self.backend.namespace}/{name}: {what}; deleting the job")
        self._delete_once(name)
        raise JobFailedError(f"{why}:\n{details}", result)

    # --- deletion and cancel ---
    def _delete_once(self, name: str) -> None:
        with self._delete_lock:
            if name in self._deleted:
                return
            self._deleted.add(name)
        self.backend.delete(name)

    def _delete_and_wait(self, name: str) -> None:
        self.backend.delete(name)
        self._wait_gone(name)

    def _wait_gone(self, name: str) -> None:
        deadline = self.clock() + self.settings.delete_timeout_s
        while self.backend.get(name) is not None:
            self._check_cancel(name)
            if self.clock() > deadline:
                raise KubellmError(f"{self.backend.kind} {self.backend.namespace}/{name} still exists "
                                   f"{self.settings.delete_timeout_s:.0f}s after deletion (a finalizer?)")
            self._cancel.wait(self.settings.poll_interval_s)

    def _check_cancel(self, name: str) -> None:
        if self._cancel.is_set():
            self._say(f"cancel requested: deleting {self.backend.kind} {self.backend.namespace}/{name}")
            self._delete_once(name)
            raise LaunchCancelledError(f"cancelled: {self.backend.kind} {self.backend.namespace}/{name} deleted")

    def _signals(self) -> _SignalScope:
        """Route SIGTERM/SIGINT to `cancel` while waiting (main thread only; restored after)."""
        return _SignalScope(self)

    def _say(self, msg: str) -> None:
        log.info("%s", msg)
        self.sink(msg)


def _install_signals(launcher: JobLauncher) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        launcher.cancel()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore


class _SignalScope:
    def __init__(self, launcher: JobLauncher) -> None:
        self.launcher = launcher
        self.restore: Callable[[], None] = lambda: None

    def __enter__(self) -> None:
        self.restore = _install_signals(self.launcher)

    def __exit__(self, *exc: object) -> None:
        self.restore()


def job_or(current: dict[str, Any] | None, fallback: Mapping[str, Any]) -> Mapping[str, Any]:
    return current if current is not None else fallback


def _event_time(ev: Mapping[str, Any]) -> str:
    """An event's last occurrence (RFC 3339, so it sorts as text); "" when it has none."""
    series = ev.get("series") or {}
    return str(ev.get("lastTimestamp") or series.get("lastObservedTime") or ev.get("eventTime")
               or (ev.get("metadata") or {}).get("creationTimestamp") or "")


def _attempt(job: Mapping[str, Any]) -> int:
    try:
        return int((job.get("metadata", {}).get("annotations") or {}).get(ATTEMPT_ANNOTATION, "1"))
    except ValueError:
        return 1


def run_appdef(
    appdef: Any,
    *,
    run_id: str,
    task_name: str,
    namespace: str | None = None,
    settings: ClusterLaunchSettings | Mapping[str, Any] | None = None,
    api: KubeApi | None = None,
    sink: Callable[[str], None] | None = None,
    before_create: Callable[[], None] | None = None,
) -> LaunchResult:
    """Run `appdef` (a one-role TorchX AppDef) as a cluster training job and wait for it.

    `run_id`/`task_name`: the KFP run ID and task name (the job name derives from them, so a retry
    re-attaches). `namespace`: None = the launcher pod's namespace (or the kubeconfig context's).
    `settings`: `ClusterLaunchSettings` or a mapping of its fields; `settings.backend` picks the job
    API. `before_create`: called right before each job creation, never when re-attaching to an existing
    job (a retry after success keeps that job's results). Returns a LaunchResult on success; raises
    JobFailedError (with the reason), LaunchCancelledError (SIGTERM), OperatorNotInstalledError,
    ConfigError (bad input, before any request).
    """
    s = settings if isinstance(settings, ClusterLaunchSettings) else validate(
        ClusterLaunchSettings, dict(settings or {}), "cluster launch settings", "settings"
    )
    name = s.job_name or translate.job_name(run_id, task_name)
    translate.validate_job_name(name, "settings.job_name" if s.job_name else "derived job name")
    own_api = api is None
    api = api or KubeApi.connect(s.api_host, retries=s.api_retries, backoff_s=s.api_backoff_s, timeout_s=s.request_timeout_s)
    try:
        backend = backend_for(s, api, namespace or default_namespace())
        ctx = translate.JobContext.from_env(run_id, task_name)
        return JobLauncher(backend, s, sink=sink, before_create=before_create).launch(appdef, ctx, name)
    finally:
        if own_api:
            api.close()

