"""Pod Security Standards `restricted` checks for pod specs (chart templates, PyTorchJobs, tests).

The admission controller that enforces `pod-security.kubernetes.io/enforce: restricted` is not
available on a laptop, so this module re-implements the profile's rules for a pod spec dict
(the `restricted` profile includes every `baseline` rule). Each violation is one string that
names where it was found, the container and the field, so a test failure reads like the
admission error a cluster would give.

    from kubellm.core.podsecurity import check_restricted, pod_specs_in
    for where, spec in pod_specs_in(manifest_dict):
        assert not check_restricted(spec, where)

Rules follow https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy
version "latest"). Windows pods (`spec.os.name: windows`) are exempt from the Linux-only rules,
as the admission controller does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

CONTAINER_KINDS = ("initContainers", "containers", "ephemeralContainers")

# restricted: the only volume types a pod may use.
ALLOWED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
# Keys of a volume entry that are not a volume source.
_VOLUME_META_KEYS = frozenset({"name"})

# restricted: the only capability a container may add (after dropping ALL).
RESTRICTED_ADD_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})

# baseline: sysctls considered namespaced and safe.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
ALLOWED_SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def _d(value: Any) -> Mapping[str, Any]:
    """A mapping or an empty one (fields may be absent or null)."""
    return value if isinstance(value, Mapping) else {}


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _check_selinux(opts: Mapping[str, Any], field: str) -> list[str]:
    out = []
    if opts.get("type", "") not in ALLOWED_SELINUX_TYPES:
        out.append(f"{field}.type={opts.get('type')!r} is not one of {sorted(ALLOWED_SELINUX_TYPES)}")
    for key in ("user", "role"):
        if opts.get(key):
            out.append(f"{field}.{key} must be unset (got {opts.get(key)!r})")
    return out


def _check_apparmor(profile: Mapping[str, Any], field: str) -> list[str]:
    if profile and profile.get("type") not in ALLOWED_APPARMOR_TYPES:
        return [f"{field}.type={profile.get('type')!r} must be RuntimeDefault or Localhost"]
    return []


def check_restricted(
    pod_spec: Mapping[str, Any], where: str = "", annotations: Mapping[str, str] | None = None
) -> list[str]:
    """Return every Pod Security `restricted` violation in `pod_spec` (empty list = compliant).

    `where` prefixes each message (e.g. "PyTorchJob/pretrain Worker"); `annotations` are the pod
    template's metadata annotations (only the legacy AppArmor annotation is read from them).
    """
    p = _prefix(where)
    errors: list[str] = []
    spec = _d(pod_spec)
    pod_sc = _d(spec.get("securityContext"))
    linux = _d(spec.get("os")).get("name", "linux") != "windows"

    # --- baseline: host namespaces, host process, volumes, sysctls, pod-level options ---
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            errors.append(f"{p}spec.{field} must be unset or false")
    if _d(pod_sc.get("windowsOptions")).get("hostProcess"):
        errors.append(f"{p}spec.securityContext.windowsOptions.hostProcess must be unset or false")
    errors += [p + e for e in _check_selinux(_d(pod_sc.get("seLinuxOptions")), "spec.securityContext.seLinuxOptions")]
    errors += [p + e for e in _check_apparmor(_d(pod_sc.get("appArmorProfile")), "spec.securityContext.appArmorProfile")]
    for sysctl in pod_sc.get("sysctls") or []:
        name = _d(sysctl).get("name")
        if name not in SAFE_SYSCTLS:
            errors.append(f"{p}spec.securityContext.sysctls: {name!r} is not a safe sysctl")
    for ann, value in _d(annotations).items():
        if ann.startswith(_APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or str(value).startswith("localhost/")
        ):
            errors.append(f"{p}annotation {ann}={value!r} must be runtime/default or localhost/*")

    for i, vol in enumerate(spec.get("volumes") or []):
        vol = _d(vol)
        name = vol.get("name", f"#{i}")
        sources = [k for k in vol if k not in _VOLUME_META_KEYS]
        for src in sources:
            if src == "hostPath":
                errors.append(f"{p}volume {name!r}: hostPath volumes are forbidden")
            elif src not in ALLOWED_VOLUME_TYPES:
                errors.append(
                    f"{p}volume {name!r}: type {src!r} is not allowed (allowed: {sorted(ALLOWED_VOLUME_TYPES)})"
                )

    # --- restricted: pod-level defaults that containers may inherit ---
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = _d(pod_sc.get("seccompProfile")).get("type")
    if pod_sc.get("runAsNonRoot") is False:
        errors.append(f"{p}spec.securityContext.runAsNonRoot must not be false")
    if pod_sc.get("runAsUser") == 0:
        errors.append(f"{p}spec.securityContext.runAsUser must not be 0 (root)")
    if linux and pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP_TYPES:
        errors.append(f"{p}spec.securityContext.seccompProfile.type={pod_seccomp!r} must be RuntimeDefault or Localhost")

    containers = [(kind, _d(c)) for kind in CONTAINER_KINDS for c in (spec.get(kind) or [])]
    if not any(kind == "containers" for kind, _ in containers):
        errors.append(f"{p}spec.containers is empty")
    for kind, c in containers:
        cname = f"{kind[:-1]} {c.get('name', '?')!r}"
        sc = _d(c.get("securityContext"))
        f = f"{p}{cname}: securityContext"
        # baseline
        if sc.get("privileged"):
            errors.append(f"{f}.privileged must be unset or false")
        if _d(sc.get("windowsOptions")).get("hostProcess"):
            errors.append(f"{f}.windowsOptions.hostProcess must be unset or false")
        if sc.get("procMount", "Default") not in ("Default", None):
            errors.append(f"{f}.procMount={sc.get('procMount')!r} must be unset or Default")
        errors += [f"{p}{cname}: {e}" for e in _check_selinux(_d(sc.get("seLinuxOptions")), "securityContext.seLinuxOptions")]
        errors += [f"{p}{cname}: {e}" for e in _check_apparmor(_d(sc.get("appArmorProfile")), "securityContext.appArmorProfile")]
        for port in c.get("ports") or []:
            if _d(port).get("hostPort"):
                errors.append(f"{p}{cname}: ports[].hostPort={_d(port).get('hostPort')} must be unset or 0")
        # restricted
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True and not pod_non_root):
            errors.append(f"{f}.runAsNonRoot must be true (here or in spec.securityContext)")
        if sc.get("runAsUser") == 0:
            errors.append(f"{f}.runAsUser must not be 0 (root)")
        if not linux:
            continue
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{f}.allowPrivilegeEscalation must be false")
        seccomp = _d(sc.get("seccompProfile")).get("type")
        if seccomp is None and pod_seccomp is None:
            errors.append(f"{f}.seccompProfile.type must be RuntimeDefault or Localhost (here or in spec.securityContext)")
        elif seccomp is not None and seccomp not in ALLOWED_SECCOMP_TYPES:
            errors.append(f"{f}.seccompProfile.type={seccomp!r} must be RuntimeDefault or Localhost")
        caps = _d(sc.get("capabilities"))
        if "ALL" not in (caps.get("drop") or []):
            errors.append(f"{f}.capabilities.drop must include ALL")
        extra = sorted(set(caps.get("add") or []) - RESTRICTED_ADD_CAPABILITIES)
        if extra:
            errors.append(f"{f}.capabilities.add={extra} is not allowed (only NET_BIND_SERVICE)")
    return errors


def _name(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{_d(obj.get('metadata')).get('name', '?')}"


def pod_specs_in(obj: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec inside a Kubernetes object: `[(where, pod_spec), ...]`.

    Understands Pod, PodTemplate, workload controllers (Deployment, StatefulSet, DaemonSet,
    ReplicaSet, ReplicationController, Job), CronJob, Kubeflow jobs with `*ReplicaSpecs`
    (PyTorchJob `spec.pytorchReplicaSpecs.<Master|Worker>.template.spec`, TFJob, MPIJob, ...) and
    `kind: List`. `where` reads like "PyTorchJob/name spec.pytorchReplicaSpecs.Worker.template.spec".
    """
    return list(_iter_pod_specs(obj))


def _template(where: str, tmpl: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    tmpl = _d(tmpl)
    if isinstance(tmpl.get("spec"), Mapping):
        yield where + ".spec", dict(tmpl["spec"])


def _iter_pod_specs(obj: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    obj = _d(obj)
    kind = obj.get("kind")
    spec = _d(obj.get("spec"))
    name = _name(obj)
    if kind == "List":
        for item in obj.get("items") or []:
            yield from _iter_pod_specs(item)
    elif kind == "Pod":
        if spec:
            yield f"{name} spec", dict(spec)
    elif kind == "PodTemplate":
        yield from _template(f"{name} template", obj.get("template"))
    elif kind == "CronJob":
        yield from _template(f"{name} spec.jobTemplate.spec.template", _d(_d(spec.get("jobTemplate")).get("spec")).get("template"))
    elif "template" in spec:
        yield from _template(f"{name} spec.template", spec.get("template"))
    else:
        # Kubeflow Training Operator v1 jobs: pytorchReplicaSpecs, tfReplicaSpecs, mpiReplicaSpecs, ...
        for key, replicas in spec.items():
            if key.endswith("ReplicaSpecs") and isinstance(replicas, Mapping):
                for rtype, rspec in replicas.items():
                    yield from _template(f"{name} spec.{key}.{rtype}.template", _d(rspec).get("template"))
