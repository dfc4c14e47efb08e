"""TorchX `AppDef` -> Kubeflow `PyTorchJob` (kubeflow.org/v1), built by kubellm.

TorchX's own Kubernetes scheduler emits Volcano jobs, so kubellm translates the one-role AppDef the
local launch uses into a PyTorchJob itself:

    from torchx.components.dist import torchrun
    app = torchrun("--config", "run.yaml", m="kubellm.training.worker", image=img, j="2x8", gpu=8)
    job = build_pytorchjob(app, name=job_name("run-uuid", "pretrain"), namespace="team-a",
                           settings=ClusterLaunchSettings(s3_secret_name="s3-creds"))

How the command is rebuilt: the AppDef's torchrun invocation (`bash -c "torchrun ..."`, `torchrun
...`, `python -m torch.distributed.run ...`, or a bare program that torchrun then wraps) is parsed
with torchrun's own argument parser; its rendezvous options are dropped and torchrun in the pod
reads them from the `PET_*` environment the Training Operator injects (PET_NNODES, PET_NODE_RANK,
PET_MASTER_ADDR/PORT, or PET_RDZV_* for elastic jobs). TorchX macros become the operator's values.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

from kubellm.core.errors import ConfigError
from kubellm.core.manifest import stable_hash
from kubellm.core.storage import redact
from kubellm.training.pytorchjob.kube import service_account_namespace
from kubellm.training.pytorchjob.settings import (
    DEFAULT_BACKOFF_LIMIT,
    DNS1035_LABEL,
    QUANTITY,
    ClusterLaunchSettings,
    label_value_problem,
)

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # the operator reads the master/rendezvous port from this port name
PORT = 23456
# The operator derives pod and Service names `<job>-worker-<index>` (Service names are DNS-1035
# labels ≤ 63): 48 + len("-worker-") + 7 digits of index still fits.
MAX_JOB_NAME = 48
LABEL_PREFIX = "kubellm.dev"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
# Env keys that look like credentials: they may only come from a Secret reference. TOKEN only as a
# word of its own (HF_TOKEN, AWS_SESSION_TOKEN), so TOKENIZERS_PARALLELISM or MAX_TOKENS are settings.
_CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|(?<![A-Z])TOKEN(?![A-Z])|ACCESS_KEY|PRIVATE_KEY|API_?KEY|"
                             r"CREDENTIAL)", re.I)
_MACRO = re.compile(r"\$\$|\$\{([^}]*)\}")
_SHELL_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-=][^}]*)?\}")
_DEFINED_ENV = frozenset({"KUBELLM_RANK0_HOST", "KUBELLM_REPLICA_ID", "KUBELLM_JOB_NAME", "KUBELLM_RUN_ID"})


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def job_name(run_id: str, task_name: str) -> str:
    """A DNS-1035 job name, stable for one (KFP run, task): `<task>-<run8>-<hash8>`, ≤ 48 chars.

    The hash covers the full run ID and task name, so two tasks (or runs) never collide even when
    their truncated slugs do; the same inputs always give the same name (a retry re-attaches).
    """
    if not run_id or not task_name:
        raise ConfigError("job name: run_id and task_name must both be non-empty (KFP run ID and task name)")
    digest = hashlib.sha256(f"{run_id}\0{task_name}".encode()).hexdigest()[:8]
    task = _slug(task_name)[:24].strip("-") or "job"
    if not task[0].isalpha():
        task = "job-" + task[:20].strip("-")
    run = _slug(run_id)[:8].strip("-")
    name = "-".join(p for p in (task, run, digest) if p)
    assert len(name) <= MAX_JOB_NAME and DNS1035_LABEL.match(name), name
    return name


def validate_job_name(name: str, field: str = "job name") -> None:
    """Raise ConfigError unless `name` is a DNS-1035 label short enough for derived pod names."""
    if len(name) > MAX_JOB_NAME or not DNS1035_LABEL.match(name):
        raise ConfigError(
            f"{field} {name!r}: must be a DNS-1035 label (lower-case letters, digits and '-', starting "
            f"with a letter, ending alphanumeric) of at most {MAX_JOB_NAME} characters so the operator's "
            f"pod names `{name}-worker-<i>` stay within 63"
        )


def _label_value(text: str) -> str:
    """`text` as a valid label value (≤ 63, alphanumeric ends); the full value goes in an annotation."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    return value


@dataclass(frozen=True)
class TorchrunCommand:
    """What a pod runs: the program torchrun starts, with the options kubellm keeps."""

    program: list[str]  # e.g. ["-m", "kubellm.training.worker", "--config", "x.yaml"]
    nproc_per_node: int | None  # from --nproc-per-node when numeric
    max_restarts: int | None


def _is_torchrun(argv: list[str]) -> int | None:
    """Index where torchrun's own arguments start in `argv`, or None when it is not torchrun."""
    if not argv:
        return None
    exe = os.path.basename(argv[0])
    if exe == "torchrun":
        return 1
    if re.fullmatch(r"python[0-9.]*", exe) and argv[1:3] == ["-m", "torch.distributed.run"]:
        return 3
    return None


def parse_command(entrypoint: str, args: list[str]) -> TorchrunCommand:
    """Split the role's command into torchrun options and the program torchrun runs.

    Uses torchrun's own parser (`torch.distributed.run.get_args_parser`), so every spelling it
    accepts (--nproc-per-node / --nproc_per_node, -m, --no-python, ...) is understood.
    """
    argv = [entrypoint, *args]
    if os.path.basename(entrypoint) in ("bash", "sh") and len(args) == 2 and args[0] == "-c":
        argv = shlex.split(args[1])
    start = _is_torchrun(argv)
    if start is None:
        exe = os.path.basename(argv[0]) if argv else ""
        if re.fullmatch(r"python[0-9.]*", exe):
            # `python -m mod ...` / `python script.py ...`: torchrun runs it with the image's python.
            rest = argv[1:]
            if rest[:1] == ["-m"] and len(rest) >= 2:
                return TorchrunCommand(["-m", *rest[1:]], None, None)
            if rest and not rest[0].startswith("-"):
                return TorchrunCommand(rest, None, None)
            raise ConfigError(f"AppDef entrypoint {shlex.join(argv)!r}: expected `python -m <module>` or `python <script>`")
        if os.path.basename(entrypoint) in ("bash", "sh"):
            # An arbitrary shell program: torchrun starts the shell itself, once per local rank.
            return TorchrunCommand(["--no-python", entrypoint, *args], None, None)
        return TorchrunCommand(["--no-python", *argv], None, None)

    from torch.distributed.run import get_args_parser  # lazy: torch is heavy and only needed here

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        ns = parser.parse_args(argv[start:])
    except (SystemExit, Exception) as e:  # argparse exits on bad input
        raise ConfigError(f"AppDef command {shlex.join(argv)!r}: not a valid torchrun command ({e})") from None
    program: list[str] = []
    if ns.module:
        program.append("-m")
    elif ns.no_python:
        program.append("--no-python")
    elif ns.run_path:
        program.append("--run-path")
    program += [ns.training_script, *ns.training_script_args]
    nproc = int(ns.nproc_per_node) if str(ns.nproc_per_node).isdigit() else None
    return TorchrunCommand(program, nproc, int(ns.max_restarts))


def substitute_macros(text: str, values: Mapping[str, str], where: str) -> str:
    """Replace TorchX macros (`${app_id}`, `${replica_id}`, `${rank0_env}`, `${img_root}`; `$$` is
    TorchX's escaped `$`). An unknown macro is an error: it would reach the pod unexpanded."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        key = m.group(1)
        if key not in values:
            raise ConfigError(f"{where}: unknown TorchX macro ${{{key}}} (known: {sorted(values)})")
        return values[key]

    return _MACRO.sub(repl, text)


def _quantity_mb(mem_mb: int) -> str:
    return f"{mem_mb}Mi"


def _shm_size(settings: ClusterLaunchSettings, mem_mb: int | None) -> str:
    if settings.shm_size:
        return settings.shm_size
    return f"{max(mem_mb // 4, 64)}Mi" if mem_mb else "1Gi"


def pod_namespace() -> str | None:
    """The launching pod's own namespace: KUBELLM_NAMESPACE (downward API, set by the pipeline), else
    the mounted service-account namespace; None outside a pod."""
    return os.environ.get("KUBELLM_NAMESPACE", "").strip() or service_account_namespace()


@dataclass(frozen=True)
class JobContext:
    """Who is launching: the KFP run and task, and (in-cluster) the launching pod."""

    run_id: str
    task_name: str
    attempt: int = 1
    owner_pod_name: str | None = None
    owner_pod_uid: str | None = None
    owner_pod_namespace: str | None = None
    """The launching pod's namespace: the job gets the pod as owner only in that same namespace (the
    garbage collector treats an owner in another namespace as absent and deletes the job)."""

    @staticmethod
    def from_env(run_id: str, task_name: str, attempt: int = 1) -> JobContext:
        """Owner pod from the downward API env the component sets (KUBELLM_POD_NAME/_UID/KUBELLM_NAMESPACE)."""
        return JobContext(
            run_id, task_name, attempt, os.environ.get("KUBELLM_POD_NAME") or None,
            os.environ.get("KUBELLM_POD_UID") or None, pod_namespace(),
        )

    def owner_reference(self, namespace: str) -> dict[str, Any] | None:
        """The launching pod as a (non-controller) owner of a job in `namespace`, or None when the pod
        is unknown or lives in another namespace."""
        if not (self.owner_pod_name and self.owner_pod_uid) or self.owner_pod_namespace != namespace:
            return None
        # Deleting the launching pod (pipeline run deleted) garbage-collects the job. Not a
        # controller reference and no blockOwnerDeletion: that would need finalizer rights on pods.
        return {"apiVersion": "v1", "kind": "Pod", "name": self.owner_pod_name, "uid": self.owner_pod_uid,
                "controller": False, "blockOwnerDeletion": False}


def _resources(role: Any, settings: ClusterLaunchSettings) -> tuple[dict[str, Any], int, int | None]:
    """(resources, gpus, memory MB) of one pod from the role's torchx Resource and the settings."""
    res = role.resource
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    cpu = str(res.cpu) if res.cpu and res.cpu > 0 else settings.cpu
    mem_mb = res.memMB if res.memMB and res.memMB > 0 else None
    memory = _quantity_mb(mem_mb) if mem_mb else settings.memory
    if mem_mb is None and settings.memory:
        mem_mb = _memory_mb(settings.memory)
    if cpu:
        requests["cpu"] = cpu
        if settings.cpu_limit:
            limits["cpu"] = cpu
    if memory:
        # Memory limit = request: a training pod that grows past its request is better OOM-killed
        # (and restarted by the operator) than left to starve the node.
        requests["memory"] = limits["memory"] = memory
    gpus = max(res.gpu, 0) if res.gpu else 0
    if gpus:
        # Extended resources: request must equal limit.
        requests[settings.gpu_resource] = limits[settings.gpu_resource] = str(gpus)
    for dev, count in (res.devices or {}).items():
        requests[dev] = limits[dev] = str(count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out, gpus, mem_mb


# Kubernetes quantity suffixes (apimachinery resource.Quantity) as multipliers of one byte.
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL: dict[str, int | Fraction] = {
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 10**3), "": 1, "k": 10**3,
    "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def _memory_mb(q: str) -> int | None:
    """A Kubernetes memory quantity (the QUANTITY grammar: `64Gi`, `2T`, `1.5Ti`, `1e9`, `500M`) in
    MiB, rounded down; None when `q` is not a quantity."""
    m = QUANTITY.match(q)
    if not m:
        return None
    number, suffix = Fraction(m.group(1)), m.group(3) or ""
    scale: int | Fraction
    if suffix in _BINARY:
        scale = _BINARY[suffix]
    elif suffix in _DECIMAL:  # "E" alone is exa; "E6"/"e6" a decimal exponent
        scale = _DECIMAL[suffix]
    else:
        exp = int(suffix[1:])
        if exp > 30:  # no memory this large exists (the API server refuses it); and 10**exp stays cheap
            return None
        scale = Fraction(10**exp) if exp >= 0 else Fraction(1, 10 ** min(-exp, 30))
    return int(number * scale / 2**20)


def is_credential_env(key: str) -> bool:
    """Whether an env var's name says it holds a credential (SECRET, PASSWORD, a TOKEN word,
    ACCESS_KEY, PRIVATE_KEY, API_KEY, CREDENTIAL): its value may only come from a Secret reference,
    never from config.
    `LaunchConfig.env` refuses such keys at config time with the same rule."""
    return bool(_CREDENTIAL_ENV.search(key))


def _check_env(env: Mapping[str, str], where: str) -> None:
    for key in env:
        if is_credential_env(key):
            raise ConfigError(
                f"{where}: env {key} would put a credential value into the PyTorchJob; credentials are "
                "referenced from a Secret instead (settings.s3_secret_name)"
            )


def _volumes(settings: ClusterLaunchSettings, shm: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts): /dev/shm in memory, writable /tmp and HOME (the root filesystem is
    read-only), and the node-local checkpoint staging volume."""
    st = settings.staging
    if st.kind == "emptyDir":
        staging: dict[str, Any] = {"emptyDir": {"sizeLimit": st.size} if st.size else {}}
    elif st.kind == "ephemeral":
        claim: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": st.size or "100Gi"}},
        }
        if st.storage_class:
            claim["storageClassName"] = st.storage_class
        staging = {"ephemeral": {"volumeClaimTemplate": {"spec": claim}}}
    else:
        staging = {"hostPath": {"path": st.host_path, "type": "DirectoryOrCreate"}}
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
        {"name": "staging", **staging},
    ]
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": settings.home_dir},
        {"name": "staging", "mountPath": st.mount_path},
    ]
    return volumes, mounts


def _env(
    role_env: Mapping[str, str], settings: ClusterLaunchSettings, name: str, ctx: JobContext, macros: Mapping[str, str]
) -> list[dict[str, Any]]:
    home = settings.home_dir
    # KUBELLM_REPLICA_ID comes first: later values may reference it as $(KUBELLM_REPLICA_ID)
    # (Kubernetes expands $(VAR) only for variables defined earlier in the list).
    env: dict[str, dict[str, Any]] = {
        "KUBELLM_REPLICA_ID": {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{REPLICA_INDEX_LABEL}']"}}},
        "KUBELLM_JOB_NAME": {"value": name},
        "KUBELLM_RUN_ID": {"value": ctx.run_id},
        "KUBELLM_RANK0_HOST": {"value": macros["rank0_host"]},
    }
    for key, value in role_env.items():
        env[key] = {"value": substitute_macros(str(value), macros, f"AppDef env {key}")}
    env.update(
        {
            "HOME": {"value": home},
            "TMPDIR": {"value": "/tmp"},
            "XDG_CACHE_HOME": {"value": f"{home}/.cache"},
            "HF_HOME": {"value": f"{home}/.cache/huggingface"},
            "TRITON_CACHE_DIR": {"value": f"{home}/.cache/triton"},
            "MPLCONFIGDIR": {"value": f"{home}/.cache/matplotlib"},
            "KUBELLM_STAGING_DIR": {"value": settings.staging.mount_path},
            # A collective waiting on a lost peer fails after this instead of hanging the others;
            # NCCL's async error handling tears the communicator down so the process exits and
            # torchrun/the operator restart the group.
            "KUBELLM_PG_TIMEOUT_S": {"value": str(settings.pg_timeout_s)},
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": {"value": "1"},
        }
    )
    if settings.s3_secret_name:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", settings.s3_access_key_key),
            ("AWS_SECRET_ACCESS_KEY", settings.s3_secret_key_key),
        ):
            env[var] = {"valueFrom": {"secretKeyRef": {"name": settings.s3_secret_name, "key": key}}}
    if settings.s3_endpoint_url:
        _check_endpoint(settings.s3_endpoint_url)
        env["KUBELLM_S3_ENDPOINT_URL"] = {"value": settings.s3_endpoint_url}
    return [{"name": k, **v} for k, v in env.items()]


def _check_endpoint(url: str) -> None:
    """Refuse an endpoint URL with `user:password@`: it would be a plain env value in the job, readable
    by anyone who can read the PyTorchJob. The error shows the URL redacted."""
    authority = urlsplit(url).netloc if "://" in url else url.split("/", 1)[0]
    if "@" in authority:
        shown = redact(url) if "://" in url else "<redacted>"
        raise ConfigError(
            f"settings.s3_endpoint_url={shown!r} carries credentials (user:password@), which would be "
            "written into the PyTorchJob as a plain env value; give the endpoint without them and reference "
            "the credentials from a Secret with settings.s3_secret_name (or use settings.s3_workload_identity)"
        )


def _security_context(settings: ClusterLaunchSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts that pass Pod Security `restricted`. A UID, GID or fsGroup
    set to None in the settings is left out, for the platform to assign (OpenShift restricted-v2)."""
    ids = {k: v for k, v in (("runAsUser", settings.run_as_user), ("runAsGroup", settings.run_as_group))
           if v is not None}
    pod: dict[str, Any] = {"runAsNonRoot": True, **ids}
    if settings.fs_group is not None:
        pod["fsGroup"] = settings.fs_group
    pod["seccompProfile"] = {"type": "RuntimeDefault"}
    container = {
        "runAsNonRoot": True,
        **ids,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return pod, container


def backoff_limit(settings: ClusterLaunchSettings, max_retries: int) -> int:
    """runPolicy.backoffLimit: settings.backoff_limit when set; else the AppDef role's max_retries
    (TorchX's torchrun component always says 0), but at least DEFAULT_BACKOFF_LIMIT when pods are
    restarted (ExitCode/OnFailure): with 0, Training Operator v1.9 fails the whole job on the first pod
    failure (a preemption, an OOM kill) before the restart policy applies."""
    if settings.backoff_limit is not None:
        return settings.backoff_limit
    retries = max(max_retries, 0)
    if settings.restart_policy in ("ExitCode", "OnFailure"):
        return max(retries, DEFAULT_BACKOFF_LIMIT)
    return retries


def build_pytorchjob(
    appdef: Any, *, name: str, namespace: str, settings: ClusterLaunchSettings, ctx: JobContext
) -> dict[str, Any]:
    """The PyTorchJob dict for `appdef` (a `torchx.specs.AppDef` with exactly one Role).

    Raises ConfigError naming the field for anything the cluster would refuse or that would leak a
    secret: several roles, more GPUs than the node type has, credentials in env, unknown macros.
    """
    validate_job_name(name)
    roles = list(getattr(appdef, "roles", []) or [])
    if len(roles) != 1:
        raise ConfigError(f"AppDef {getattr(appdef, 'name', '?')!r}: expected exactly one role, got {len(roles)}")
    role = roles[0]
    where = f"AppDef role {role.name!r}"
    image = settings.image or role.image
    if not image:
        raise ConfigError(f"{where}: image is empty (set the role's image or settings.image)")
    if role.num_replicas < 1:
        raise ConfigError(f"{where}: num_replicas must be ≥ 1 (got {role.num_replicas})")
    if not settings.s3_secret_name and not settings.s3_workload_identity:
        raise ConfigError(
            "settings.s3_secret_name is not set: name the Secret holding the S3 credentials "
            f"(keys {settings.s3_access_key_key}, {settings.s3_secret_key_key}), or set "
            "settings.s3_workload_identity: true when the ServiceAccount carries them"
        )
    _check_env(role.env, where)

    resources, gpus, mem_mb = _resources(role, settings)
    if settings.node_gpus is not None and gpus > settings.node_gpus:
        raise ConfigError(
            f"{where}: resource.gpu={gpus} GPUs per pod, but the configured node type has "
            f"settings.node_gpus={settings.node_gpus}; use more pods (nodes) with at most "
            f"{settings.node_gpus} GPUs each"
        )
    cmd = parse_command(role.entrypoint, list(role.args))
    nproc = settings.nproc_per_node or cmd.nproc_per_node or (gpus or 1)
    if gpus and nproc > gpus:
        raise ConfigError(
            f"{where}: {nproc} processes per pod but only resource.gpu={gpus} GPUs; each rank needs its own GPU "
            "(lower nproc_per_node or raise the GPU count)"
        )

    min_nodes = role.min_replicas if role.min_replicas is not None else role.num_replicas
    elastic = settings.topology == "elastic" or (settings.topology == "auto" and min_nodes < role.num_replicas)
    rank0_host = f"{name}-worker-0" if elastic else f"{name}-master-0"
    macros = {"app_id": name, "replica_id": "$(KUBELLM_REPLICA_ID)", "rank0_env": "KUBELLM_RANK0_HOST", "img_root": "",
              "rank0_host": rank0_host}
    program = [substitute_macros(a, macros, f"{where} args") for a in cmd.program]
    if not (program[:1] == ["--no-python"] and os.path.basename(program[1]) in ("bash", "sh")):
        # Exec form (no shell): `${VAR}`/`${VAR:=default}` left by TorchX's rank0_env idiom would reach
        # the program verbatim; Kubernetes expands `$(VAR)` for variables the container defines.
        program = [_SHELL_REF.sub(lambda m: f"$({m.group(1)})" if m.group(1) in _DEFINED_ENV else m.group(0), a)
                   for a in program]
    macros_public = {k: v for k, v in macros.items() if k != "rank0_host"}
    # torchrun reads --nnodes/--nproc-per-node/--node-rank/--master-addr/--master-port (and, for
    # elastic jobs, --rdzv-backend/--rdzv-endpoint/--rdzv-id) from the PET_* env the operator injects.
    max_restarts = settings.max_restarts if settings.max_restarts is not None else (cmd.max_restarts or 3)
    # --nproc-per-node is always explicit: the operator sets PET_NPROC_PER_NODE only with a Master
    # (spec.nprocPerNode) or from the deprecated elasticPolicy.nProcPerNode, so a Worker-only elastic
    # job would otherwise run torchrun's default of one process per pod.
    command = [*settings.torchrun, "--max-restarts", str(max_restarts), "--monitor-interval", "5",
               "--nproc-per-node", str(nproc), *program]

    pod_sc, container_sc = _security_context(settings)
    volumes, mounts = _volumes(settings, _shm_size(settings, mem_mb))
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": _env(role.env, settings, name, ctx, {**macros_public, "rank0_host": rank0_host}),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": resources,
        "securityContext": container_sc,
        "volumeMounts": mounts,
        # On a crash the last lines of the log become the termination message the launcher reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.s3_config_map:
        container["envFrom"] = [{"configMapRef": {"name": settings.s3_config_map}}]

    labels = {
        "app.kubernetes.io/name": "kubellm",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/managed-by": "kubellm",
        f"{LABEL_PREFIX}/task": _label_value(ctx.task_name),
        f"{LABEL_PREFIX}/run-id": _label_value(ctx.run_id),
        **settings.labels,
    }
    for key, value in labels.items():
        problem = label_value_problem(value)
        if problem:
            raise ConfigError(f"label {key}: {problem}")
    node_selector = dict(settings.node_selector)
    for key, value in (role.resource.capabilities or {}).items():
        if isinstance(value, str):
            node_selector[key] = value
    pod_spec: dict[str, Any] = {
        "securityContext": pod_sc,
        # Training pods never talk to the API server: no token in the pod.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_s,
        "containers": [container],
        "volumes": volumes,
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.priority_class:
        pod_spec["priorityClassName"] = settings.priority_class
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    template: dict[str, Any] = {"metadata": {"labels": dict(labels)}, "spec": pod_spec}
    if settings.pod_annotations:
        template["metadata"]["annotations"] = dict(settings.pod_annotations)

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": settings.restart_policy, "template": copy.deepcopy(template)}

    run_policy: dict[str, Any] = {
        "backoffLimit": backoff_limit(settings, role.max_retries),
        "cleanPodPolicy": settings.clean_pod_policy,
    }
    if settings.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    if settings.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = settings.active_deadline_seconds
    spec: dict[str, Any] = {"nprocPerNode": str(nproc), "runPolicy": run_policy}
    if elastic:
        spec["elasticPolicy"] = {
            "minReplicas": min_nodes,
            "maxReplicas": role.num_replicas,
            "rdzvBackend": "c10d",
            "rdzvId": name,
            "rdzvConf": [{"key": "join_timeout", "value": str(settings.rdzv_join_timeout_s)}],
            "maxRestarts": max_restarts,
        }
        spec["pytorchReplicaSpecs"] = {"Worker": replica(role.num_replicas)}
    else:
        replicas = {"Master": replica(1)}
        if role.num_replicas > 1:
            replicas["Worker"] = replica(role.num_replicas - 1)
        spec["pytorchReplicaSpecs"] = replicas

    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": dict(labels),
        "annotations": {
            f"{LABEL_PREFIX}/run-id": ctx.run_id,
            f"{LABEL_PREFIX}/task-name": ctx.task_name,
            f"{LABEL_PREFIX}/attempt": str(ctx.attempt),
            f"{LABEL_PREFIX}/spec-hash": stable_hash(spec)[:16],
        },
    }
    owner = ctx.owner_reference(namespace)
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}
