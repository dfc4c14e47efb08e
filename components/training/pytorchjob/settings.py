"""Settings of the cluster launcher: how a TorchX `AppDef` becomes a Kubernetes training job.

One typed model (`ClusterLaunchSettings`); a stage's run-config can embed it, and
`run_appdef(..., settings=...)` accepts the model or a plain mapping (validated here, so a wrong key
or value fails before anything reaches the API server, naming the field).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from kubellm.core.config import StrictModel

# Kubernetes name grammars (apimachinery/pkg/util/validation).
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?\d+)?$")
DEFAULT_BACKOFF_LIMIT = 3
"""runPolicy.backoffLimit when settings.backoff_limit is None and pods are restarted (ExitCode/OnFailure)."""


def dns1123_subdomain_problem(value: str) -> str | None:
    """Why `value` is not a DNS-1123 subdomain (Secret/ConfigMap/ServiceAccount names), or None."""
    if not value or len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        return "must be a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', ≤ 253 chars"
    return None


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label/annotation key, or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return f"label key prefix {prefix!r} must be a DNS-1123 subdomain"
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        return f"label key name {name!r} must be ≤ 63 chars of [A-Za-z0-9-_.], alphanumeric at both ends"
    return None


def label_value_problem(value: str) -> str | None:
    if len(value) > 63 or not LABEL_VALUE.match(value):
        return f"label value {value!r} must be ≤ 63 chars of [A-Za-z0-9-_.], alphanumeric at both ends"
    return None


class StagingVolume(StrictModel):
    """Node-local scratch for checkpoint shards (each rank writes here, then uploads to S3)."""

    kind: Literal["emptyDir", "ephemeral", "hostPath"] = "emptyDir"
    """emptyDir (node disk, passes Pod Security `restricted`); ephemeral (a generic ephemeral PVC, e.g.
    a local-NVMe storage class; passes `restricted`); hostPath (a node directory; NOT allowed by
    `restricted`, only for namespaces labelled `baseline`/`privileged`)."""
    mount_path: str = "/var/kubellm/staging"
    """Where the volume is mounted; exported to the trainer as KUBELLM_STAGING_DIR."""
    size: str | None = "100Gi"
    """emptyDir sizeLimit / ephemeral claim size (a Kubernetes quantity); None = no limit (emptyDir)."""
    storage_class: str | None = None
    """Storage class of the ephemeral claim (kind=ephemeral); None = the cluster default."""
    host_path: str = "/mnt/kubellm-staging"
    """Node directory (kind=hostPath)."""

    @field_validator("size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not QUANTITY.match(v):
            raise ValueError("must be a Kubernetes quantity such as 100Gi")
        return v


class ClusterLaunchSettings(StrictModel):
    """How the launcher runs a TorchX AppDef on Kubernetes (PyTorchJob today, TrainJob later)."""

    backend: Literal["pytorchjob", "trainjob"] = "pytorchjob"
    """Job API: pytorchjob (Kubeflow Training Operator v1, kubeflow.org/v1) or trainjob (Kubeflow
    Trainer v2; the seam exists, the backend is not written yet)."""
    job_name: str | None = None
    """Explicit job name (a DNS-1035 label ≤ 48 chars); None = derived from the KFP run ID and task."""
    topology: Literal["auto", "master-worker", "elastic"] = "auto"
    """auto: elastic when the AppDef's role has min_replicas < num_replicas, else Master + Workers.
    elastic: Worker replicas only with an elasticPolicy (c10d rendezvous on worker-0)."""
    nproc_per_node: int | None = Field(default=None, ge=1)
    """Processes per pod; None = the AppDef's torchrun --nproc-per-node, else its GPU count, else 1."""

    # --- image and identity ---
    image: str | None = None
    """Override the AppDef's image (e.g. the digest-pinned training image)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Container imagePullPolicy."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Names of Secrets with registry credentials."""
    service_account: str | None = None
    """ServiceAccount of the training pods (they need no API access: the token is not mounted)."""
    run_as_user: int | None = Field(default=10001, ge=1)
    """Numeric non-root UID of the training container (the image's USER). None leaves runAsUser out,
    for platforms that assign one (OpenShift restricted-v2 refuses a fixed UID outside the
    namespace's range); runAsNonRoot stays true, and the image works for any UID in group 0."""
    run_as_group: int | None = Field(default=0, ge=0)
    """Numeric GID; None leaves runAsGroup out."""
    fs_group: int | None = Field(default=0, ge=0)
    """fsGroup so mounted volumes are writable by the UID; None leaves it out (OpenShift
    restricted-v2 assigns one from the namespace's range)."""
    home_dir: str = "/home/kubellm"
    """HOME in the container; a writable emptyDir (the root filesystem is read-only)."""

    # --- resources and placement ---
    cpu: str | None = None
    """CPU request/limit per pod when the AppDef gives none (cpu=-1), e.g. '8'."""
    memory: str | None = None
    """Memory request/limit per pod when the AppDef gives none, e.g. '64Gi'."""
    cpu_limit: bool = True
    """Also set the CPU limit (= request, Guaranteed QoS); False leaves CPU unlimited."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource name of a GPU."""
    node_gpus: int | None = Field(default=None, ge=0)
    """GPUs per node of the configured node type; a pod asking for more is refused up front."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """nodeSelector of the training pods (merged with the AppDef resource's capabilities)."""
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Pod tolerations (Kubernetes Toleration objects), e.g. for a GPU taint."""
    priority_class: str | None = None
    """priorityClassName of the training pods."""
    shm_size: str | None = None
    """sizeLimit of the memory-backed /dev/shm; None = a quarter of the pod's memory (1Gi if unknown)."""
    staging: StagingVolume = Field(default_factory=StagingVolume)
    """Node-local checkpoint staging volume."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on the job and its pods (validated as Kubernetes labels)."""
    pod_annotations: dict[str, str] = Field(default_factory=lambda: {"sidecar.istio.io/inject": "false"})
    """Annotations on the training pods. The default keeps Istio from injecting its sidecar (in a
    Kubeflow profile namespace it would keep every pod Running after training ends, so the job never
    succeeds; KFP's own pipeline pods opt out the same way); set `{}` or your own to change it."""

    # --- S3 ---
    s3_secret_name: str | None = None
    """Secret holding the S3 credentials (referenced, never copied). Required unless
    s3_workload_identity is true."""
    s3_access_key_key: str = "AWS_ACCESS_KEY_ID"
    """Key in the Secret with the access key id."""
    s3_secret_key_key: str = "AWS_SECRET_ACCESS_KEY"
    """Key in the Secret with the secret access key."""
    s3_workload_identity: bool = False
    """Credentials come from workload identity (IRSA, GKE WI) on the ServiceAccount; no Secret."""
    s3_config_map: str | None = None
    """ConfigMap whose keys become env (e.g. KUBELLM_S3_ENDPOINT_URL, AWS_REGION), via envFrom."""
    s3_endpoint_url: str | None = None
    """Set KUBELLM_S3_ENDPOINT_URL directly (MinIO/Ceph); None = from the ConfigMap or AWS. It is a
    plain env value in the PyTorchJob, so a `user:password@` in it is refused: credentials come from
    s3_secret_name."""

    # --- fault tolerance ---
    backoff_limit: int | None = Field(default=None, ge=0)
    """runPolicy.backoffLimit; None = the AppDef role's max_retries, but at least DEFAULT_BACKOFF_LIMIT
    (3) with restart_policy ExitCode or OnFailure. Training Operator v1.9 fails the whole job on a pod
    failure once its retry count reaches the limit, before the restart policy applies, so 0 would turn
    the first preempted or OOM-killed pod into a failed job. v1.9 does not cap ExitCode restarts by
    count (it counts only OnFailure/Always container restarts against the limit): bound a job that
    keeps getting killed with active_deadline_seconds."""
    restart_policy: Literal["OnFailure", "Never", "ExitCode"] = "ExitCode"
    """Replica restartPolicy. ExitCode: exit codes 1-127 (a Python error) fail the job at once,
    128+ (killed, preempted, OOM) restart the pod. OnFailure restarts on any non-zero exit; Never
    fails the job on the first pod failure. Always is refused: a pod restarted on exit 0 never
    reaches Succeeded, so the job would never finish."""
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    """runPolicy.cleanPodPolicy: Running frees GPUs of pods still running when the job ends but keeps
    failed pods for their logs."""
    ttl_seconds_after_finished: int | None = Field(default=7 * 24 * 3600, ge=0)
    """runPolicy.ttlSecondsAfterFinished: finished jobs are garbage-collected after this."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """runPolicy.activeDeadlineSeconds: hard wall-clock limit of the job."""
    max_restarts: int | None = Field(default=None, ge=0)
    """torchrun --max-restarts: worker-group restarts inside a pod (elastic: also elasticPolicy.maxRestarts);
    None = the AppDef's torchrun --max-restarts when it sets one (> 0), else 3."""
    pg_timeout_s: int = Field(default=600, ge=10)
    """Process-group timeout (KUBELLM_PG_TIMEOUT_S, NCCL async error handling on): a collective
    waiting on a lost peer fails after this instead of hanging the others."""
    rdzv_join_timeout_s: int = Field(default=900, ge=10)
    """Elastic rendezvous join timeout."""
    termination_grace_s: int = Field(default=60, ge=0)
    """terminationGracePeriodSeconds of the training pods."""
    recreate_on_failure: int = Field(default=0, ge=0)
    """Within one launch, delete and recreate a Failed job this many times (training resumes from the
    last committed checkpoint). A KFP retry always recreates a Failed job."""

    # --- launcher behaviour ---
    api_host: str | None = None
    """Explicit API server URL (tests, port-forwards); None = in-cluster config, else kubeconfig."""
    poll_interval_s: float = Field(default=10.0, gt=0)
    """Seconds between status polls."""
    api_retries: int = Field(default=6, ge=0)
    """Retries of a transient API error (429, 5xx, connection errors) with exponential backoff."""
    api_backoff_s: float = Field(default=1.0, gt=0)
    """First backoff; doubles each retry (capped at 30 s; Retry-After honoured)."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """Per-request timeout."""
    stream_logs: bool = True
    """Stream the master's (elastic: worker-0's) logs to the launcher's stdout."""
    config_error_grace_s: float = Field(default=60.0, ge=0)
    """Fail when a pod stays in CreateContainerConfigError (e.g. a missing Secret) this long."""
    image_pull_grace_s: float = Field(default=300.0, ge=0)
    """Fail when a pod cannot pull its image (ImagePullBackOff/ErrImagePull) this long."""
    unschedulable_timeout_s: float | None = Field(default=1800.0, gt=0)
    """Fail when a pod stays unschedulable (PodScheduled=False: no node fits its GPUs/CPU/memory,
    selector or tolerations) this long; long enough for a cluster autoscaler. None = wait forever."""
    delete_timeout_s: float = Field(default=300.0, gt=0)
    """How long to wait for a deleted Failed job to disappear before recreating it."""
    torchrun: list[str] = Field(default_factory=lambda: ["python", "-m", "kubellm.training.torchrun"])
    """How the container starts torchrun: kubellm's wrapper by default, which exits 128 + the signal
    when the pod is evicted or a worker is killed (plain torchrun exits 1 there, which
    `restart_policy: ExitCode` reads as a permanent failure)."""

    @field_validator("restart_policy", mode="before")
    @classmethod
    def _restart_policy(cls, v: Any) -> Any:
        if v == "Always":
            raise ValueError(
                "Always is not supported: a training pod restarted after exit 0 never reaches Succeeded, so "
                "the job would never finish; use ExitCode (restart on 128+: killed, preempted, OOM) or OnFailure"
            )
        return v

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 48 or not DNS1035_LABEL.match(v)):
            raise ValueError(
                "must be a DNS-1035 label (lower-case letters, digits, '-', starting with a letter) of at most "
                "48 characters, so the operator's pod and service names (<name>-worker-<i>) stay ≤ 63"
            )
        return v

    @field_validator("s3_secret_name", "s3_config_map", "service_account", "priority_class")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None:
            problem = dns1123_subdomain_problem(v)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, v: list[str]) -> list[str]:
        for name in v:
            problem = dns1123_subdomain_problem(name)
            if problem:
                raise ValueError(f"{name!r}: {problem}")
        return v

    @field_validator("labels", "node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            problem = label_key_problem(key) or label_value_problem(value)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("pod_annotations")
    @classmethod
    def _annotation_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            problem = label_key_problem(key)  # annotation keys follow the label key syntax
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("cpu", "memory", "shm_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not QUANTITY.match(v):
            raise ValueError("must be a Kubernetes quantity such as 8, 500m, 64Gi")
        return v

    @field_validator("s3_access_key_key", "s3_secret_key_key")
    @classmethod
    def _secret_key(cls, v: str) -> str:
        if not re.match(r"^[-._a-zA-Z0-9]+$", v):
            raise ValueError("must be a Secret data key ([-._a-zA-Z0-9]+)")
        return v
