"""Launch backends: the job API behind the launcher (PyTorchJob today, Kubeflow Trainer v2 later).

The launcher (`launcher.JobLauncher`) owns the lifecycle — idempotent create, re-attach, recreate
after failure, status, logs, cancel — and talks to a job API only through `LaunchBackend`. A
Kubeflow Trainer v2 `TrainJob` backend is one more subclass registered in `BACKENDS`; the stages
and the launcher do not change (`settings.backend: trainjob` selects it).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubellm.core.errors import ConfigError, KubellmError
from kubellm.training.pytorchjob import translate
from kubellm.training.pytorchjob.kube import KubeApi, KubeApiError, _describe
from kubellm.training.pytorchjob.settings import ClusterLaunchSettings

# Phases a job moves through (PyTorchJob condition types; TrainJob maps onto the same names).
PENDING, CREATED, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending", "Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed"
)
TERMINAL = frozenset({SUCCEEDED, FAILED})
# Container waiting reasons that will not fix themselves (the launcher fails after a grace period).
CONFIG_ERRORS = frozenset({"CreateContainerConfigError", "CreateContainerError", "InvalidImageName"})
PULL_ERRORS = frozenset({"ImagePullBackOff", "ErrImagePull"})
# Warning events the operator records on the job when the API server refuses its pods (quota, a missing
# ServiceAccount or PriorityClass, Pod Security admission): the pods never exist, so no pod status says so.
POD_CREATE_ERRORS = frozenset({"FailedCreatePod", "FailedCreateService", "FailedCreate"})


class OperatorNotInstalledError(KubellmError):
    """The API server does not serve the job's custom resource: the operator is missing."""


class JobExistsError(KubellmError):
    """Create answered 409: a job with that name exists (another attempt created it)."""


class JobConflictError(KubellmError):
    """An update answered 409: the job changed since it was read (read it again and retry)."""


@dataclass(frozen=True)
class JobStatus:
    phase: str
    reason: str = ""
    message: str = ""
    deleting: bool = False

    def describe(self) -> str:
        extra = f" ({self.reason}: {self.message})" if self.reason or self.message else ""
        return f"{self.phase}{extra}"


class LaunchBackend(abc.ABC):
    """One job API. Subclasses say how to build, create, read, delete and interpret a job; the
    shared pod/event helpers here work for any operator that labels its pods."""

    kind: str = ""

    def __init__(self, api: KubeApi, namespace: str, settings: ClusterLaunchSettings) -> None:
        self.api = api
        self.namespace = namespace
        self.settings = settings

    # --- what each backend defines ---
    @abc.abstractmethod
    def check_installed(self) -> None:
        """Raise OperatorNotInstalledError when the API server does not serve the job kind."""

    @abc.abstractmethod
    def build(self, appdef: Any, name: str, ctx: translate.JobContext) -> dict[str, Any]:
        """The job object for `appdef` (validated; nothing is sent)."""

    @abc.abstractmethod
    def get(self, name: str) -> dict[str, Any] | None:
        """The job, or None when it does not exist."""

    @abc.abstractmethod
    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create the job; raise JobExistsError on 409."""

    @abc.abstractmethod
    def delete(self, name: str) -> bool:
        """Delete the job (its pods follow); False when it was already gone."""

    @abc.abstractmethod
    def status(self, obj: Mapping[str, Any]) -> JobStatus:
        """The job's phase and the reason the operator gives."""

    @abc.abstractmethod
    def set_owner_references(self, name: str, refs: list[dict[str, Any]], resource_version: str | None
                             ) -> dict[str, Any] | None:
        """Replace the job's metadata.ownerReferences with `refs` (only if it is still at
        `resource_version`: JobConflictError otherwise); the updated job, or None when it is gone."""

    @abc.abstractmethod
    def expected_pods(self, obj: Mapping[str, Any]) -> int:
        """How many pods the operator creates for the job."""

    @abc.abstractmethod
    def pod_selector(self, name: str) -> str:
        """Label selector of the job's pods."""

    @abc.abstractmethod
    def log_pod(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        """(pod name, container) whose log the launcher streams (rank 0)."""

    # --- shared helpers ---
    def pods(self, name: str) -> list[dict[str, Any]]:
        data = self.api.call(
            f"list pods of {self.kind} {name}", self.api.core.list_namespaced_pod, self.namespace,
            label_selector=self.pod_selector(name),
        )
        return list(data.get("items") or [])

    def events(self, names: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for n in names:
            try:
                data = self.api.call(
                    f"list events of {n}", self.api.core.list_namespaced_event, self.namespace,
                    field_selector=f"involvedObject.name={n}",
                )
            except (ApiException, KubeApiError):  # events are best-effort context
                continue
            out += list(data.get("items") or [])
        return out

    def failure_details(self, obj: Mapping[str, Any], pods: list[dict[str, Any]] | None = None) -> list[str]:
        """Why the job failed: its condition, each failed container (exit code, reason, termination
        message — the log tail with FallbackToLogsOnError), stuck containers and Warning events."""
        name = obj.get("metadata", {}).get("name", "?")
        st = self.status(obj)
        lines = [f"{self.kind} {self.namespace}/{name}: {st.describe()}"]
        pods = self.pods(name) if pods is None else pods
        for pod in pods:
            lines += pod_problems(pod)
        for ev in self.events([name, *[p.get("metadata", {}).get("name", "") for p in pods]]):
            if ev.get("type") == "Warning":
                inv = ev.get("involvedObject", {})
                lines.append(f"event {inv.get('kind', '?')}/{inv.get('name', '?')}: {ev.get('reason', '')}: {ev.get('message', '')}")
        return lines


def pod_problems(pod: Mapping[str, Any]) -> list[str]:
    """Human lines for each failed or stuck container of a pod."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    out = []
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        state = cs.get("state") or {}
        for term in (state.get("terminated"), (cs.get("lastState") or {}).get("terminated")):
            if term and term.get("exitCode", 0) != 0:
                msg = (term.get("message") or "").strip()
                tail = "\n    ".join(msg.splitlines()[-20:])
                out.append(
                    f"pod {name} container {cs.get('name')}: exit code {term.get('exitCode')} "
                    f"({term.get('reason', '')})" + (f"\n    {tail}" if tail else "")
                )
                break
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in CONFIG_ERRORS | PULL_ERRORS:
            out.append(f"pod {name} container {cs.get('name')}: {waiting.get('reason')}: {waiting.get('message', '')}")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            out.append(f"pod {name}: not scheduled ({cond.get('reason', '')}: {cond.get('message', '')})")
    return out


def stuck_reasons(pod: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(waiting reason, message) of containers stuck in a state that needs a person."""
    status = pod.get("status") or {}
    out = []
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in CONFIG_ERRORS | PULL_ERRORS:
            out.append((waiting["reason"], waiting.get("message", "")))
    return out


class PyTorchJobBackend(LaunchBackend):
    """Kubeflow Training Operator v1: `kubeflow.org/v1` PyTorchJob."""

    kind = translate.KIND

    def _args(self) -> tuple[str, str, str, str]:
        return translate.GROUP, translate.VERSION, self.namespace, translate.PLURAL

    def check_installed(self) -> None:
        try:
            data = self.api.call(
                f"discover {translate.GROUP}/{translate.VERSION}", self.api.custom.get_api_resources,
                translate.GROUP, translate.VERSION,
            )
        except ApiException as e:
            if e.status == 404:
                raise self._not_installed() from None
            raise KubeApiError(f"discover {translate.GROUP}/{translate.VERSION}: {_describe(e)}", e.status) from None
        if not any(r.get("name") == translate.PLURAL for r in data.get("resources") or []):
            raise self._not_installed()

    @staticmethod
    def _not_installed() -> OperatorNotInstalledError:
        return OperatorNotInstalledError(
            f"Training Operator not installed: the API server does not serve {translate.GROUP}/{translate.VERSION} "
            f"{translate.PLURAL}. Install the Kubeflow Training Operator (v1.9) or choose another backend "
            "(settings.backend)"
        )

    def build(self, appdef: Any, name: str, ctx: translate.JobContext) -> dict[str, Any]:
        return translate.build_pytorchjob(appdef, name=name, namespace=self.namespace, settings=self.settings, ctx=ctx)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.api.call(f"get {self.kind} {name}", self.api.custom.get_namespaced_custom_object,
                                      *self._args(), name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise KubeApiError(f"get {self.kind} {self.namespace}/{name}: {_describe(e)}", e.status) from None

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        try:
            return dict(self.api.call(f"create {self.kind} {name}", self.api.custom.create_namespaced_custom_object,
                                      *self._args(), dict(obj)))
        except ApiException as e:
            if e.status == 409:
                raise JobExistsError(f"{self.kind} {self.namespace}/{name} already exists") from None
            if e.status == 404:
                if _not_found_kind(e) == "namespaces":
                    raise ConfigError(f"namespace {self.namespace!r} does not exist ({_describe(e)}); create it or "
                                      "pass another namespace") from None
                raise self._not_installed() from None
            if e.status in (400, 422):
                raise ConfigError(f"{self.kind} {self.namespace}/{name} refused by the API server: {_describe(e)}") from None
            raise KubeApiError(f"create {self.kind} {self.namespace}/{name}: {_describe(e)}", e.status) from None

    def delete(self, name: str) -> bool:
        try:
            # Background: the call returns at once; the operator's pods go with the job.
            self.api.call(f"delete {self.kind} {name}", self.api.custom.delete_namespaced_custom_object,
                          *self._args(), name, propagation_policy="Background")
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise KubeApiError(f"delete {self.kind} {self.namespace}/{name}: {_describe(e)}", e.status) from None

    def status(self, obj: Mapping[str, Any]) -> JobStatus:
        deleting = bool(obj.get("metadata", {}).get("deletionTimestamp"))
        conds = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        by_type = {c.get("type"): c for c in conds}
        for phase in (FAILED, SUCCEEDED):  # terminal conditions win whatever their order
            if phase in by_type:
                c = by_type[phase]
                return JobStatus(phase, c.get("reason", ""), c.get("message", ""), deleting)
        if conds:
            c = conds[-1]  # the operator appends conditions in time order
            return JobStatus(str(c.get("type")), c.get("reason", ""), c.get("message", ""), deleting)
        return JobStatus(PENDING, deleting=deleting)

    def set_owner_references(self, name: str, refs: list[dict[str, Any]], resource_version: str | None
                             ) -> dict[str, Any] | None:
        meta: dict[str, Any] = {"ownerReferences": refs}
        if resource_version:
            meta["resourceVersion"] = resource_version  # optimistic concurrency: 409 if it changed
        try:
            # A JSON merge patch (the client's content type for custom objects): the list is replaced whole.
            return dict(self.api.call(f"patch {self.kind} {name}", self.api.custom.patch_namespaced_custom_object,
                                      *self._args(), name, {"metadata": meta}))
        except ApiException as e:
            if e.status == 404:
                return None
            if e.status == 409:
                raise JobConflictError(f"{self.kind} {self.namespace}/{name} changed while being updated") from None
            raise KubeApiError(f"patch {self.kind} {self.namespace}/{name}: {_describe(e)}", e.status) from None

    def expected_pods(self, obj: Mapping[str, Any]) -> int:
        replicas = (obj.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        return sum(int((r or {}).get("replicas", 1)) for r in replicas.values())

    def pod_selector(self, name: str) -> str:
        return f"training.kubeflow.org/job-name={name}"

    def log_pod(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        name = obj["metadata"]["name"]
        replicas = (obj.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        role = "master" if "Master" in replicas else "worker"
        return f"{name}-{role}-0", translate.CONTAINER


def _not_found_kind(e: ApiException) -> str:
    """The `details.kind` of a 404 Status body ("namespaces" when the namespace is missing)."""
    body = e.body.decode() if isinstance(e.body, bytes) else (e.body or "")
    try:
        return str((json.loads(body).get("details") or {}).get("kind") or "")
    except (ValueError, AttributeError):
        return ""


# settings.backend -> backend class. A Kubeflow Trainer v2 backend registers "trainjob" here.
BACKENDS: dict[str, type[LaunchBackend]] = {"pytorchjob": PyTorchJobBackend}


def backend_for(settings: ClusterLaunchSettings, api: KubeApi, namespace: str) -> LaunchBackend:
    try:
        cls = BACKENDS[settings.backend]
    except KeyError:
        raise ConfigError(
            f"settings.backend={settings.backend!r}: no launch backend is implemented for it yet "
            f"(available: {sorted(BACKENDS)}); Kubeflow Trainer v2 TrainJob support plugs in as a LaunchBackend"
        ) from None
    return cls(api, namespace, settings)
