"""Pod Security `restricted` checker: compliant specs pass, each kind of violation is named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubellm.core.podsecurity import check_restricted, pod_specs_in

RESTRICTED_SC = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def good_spec() -> dict[str, Any]:
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [{"name": "init", "image": "busybox", "securityContext": copy.deepcopy(RESTRICTED_SC)}],
        "containers": [
            {
                "name": "main",
                "image": "x",
                "ports": [{"containerPort": 8080}],
                "securityContext": copy.deepcopy(RESTRICTED_SC),
            }
        ],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "c"}},
            {"name": "creds", "secret": {"secretName": "s"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "d"}},
        ],
    }


def test_good_spec_passes() -> None:
    assert check_restricted(good_spec()) == []


def test_container_level_settings_suffice_without_pod_level() -> None:
    spec = good_spec()
    spec["securityContext"] = {}
    for c in spec["initContainers"] + spec["containers"]:
        c["securityContext"].update(runAsNonRoot=True, seccompProfile={"type": "Localhost", "localhostProfile": "p"})
    assert check_restricted(spec) == []


def test_net_bind_service_is_the_only_addable_capability() -> None:
    spec = good_spec()
    spec["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert check_restricted(spec) == []
    spec["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE", "SYS_ADMIN"]
    (err,) = check_restricted(spec, "Deployment/x")
    assert err.startswith("Deployment/x: container 'main'") and "SYS_ADMIN" in err


def _mutate(path: str, value: Any) -> dict[str, Any]:
    spec = good_spec()
    node: Any = spec
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return spec


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        ("hostNetwork", True, "spec.hostNetwork"),
        ("hostPID", True, "spec.hostPID"),
        ("hostIPC", True, "spec.hostIPC"),
        ("securityContext.runAsNonRoot", _DELETE, "container 'main': securityContext.runAsNonRoot"),
        ("securityContext.runAsNonRoot", False, "spec.securityContext.runAsNonRoot must not be false"),
        ("securityContext.runAsUser", 0, "spec.securityContext.runAsUser must not be 0"),
        ("securityContext.seccompProfile", _DELETE, "container 'main': securityContext.seccompProfile"),
        ("securityContext.seccompProfile", {"type": "Unconfined"}, "spec.securityContext.seccompProfile.type='Unconfined'"),
        ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}], "kernel.msgmax"),
        ("securityContext.seLinuxOptions", {"type": "spc_t"}, "seLinuxOptions.type='spc_t'"),
        ("securityContext.windowsOptions", {"hostProcess": True}, "hostProcess"),
        ("containers.0.securityContext.privileged", True, "container 'main': securityContext.privileged"),
        ("containers.0.securityContext.allowPrivilegeEscalation", _DELETE, "container 'main': securityContext.allowPrivilegeEscalation"),
        ("containers.0.securityContext.allowPrivilegeEscalation", True, "allowPrivilegeEscalation must be false"),
        ("containers.0.securityContext.runAsUser", 0, "container 'main': securityContext.runAsUser must not be 0"),
        ("containers.0.securityContext.runAsNonRoot", False, "container 'main': securityContext.runAsNonRoot"),
        ("containers.0.securityContext.capabilities", {}, "container 'main': securityContext.capabilities.drop must include ALL"),
        ("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}, "container 'main': securityContext.seccompProfile.type='Unconfined'"),
        ("containers.0.securityContext.procMount", "Unmasked", "procMount"),
        ("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}, "appArmorProfile"),
        ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "container 'main': ports[].hostPort=80"),
        ("initContainers.0.securityContext.privileged", True, "initContainer 'init': securityContext.privileged"),
        ("volumes", [{"name": "h", "hostPath": {"path": "/"}}], "volume 'h': hostPath"),
        ("volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}], "volume 'n': type 'nfs' is not allowed"),
        ("containers", [], "spec.containers is empty"),
    ],
)
def test_each_violation_is_named(path: str, value: Any, expect: str) -> None:
    errors = check_restricted(_mutate(path, value), "Job/j")
    assert errors, f"{path}={value!r} should violate restricted"
    assert all(e.startswith("Job/j: ") for e in errors)
    assert any(expect in e for e in errors), errors


def test_ephemeral_containers_are_checked() -> None:
    spec = good_spec()
    spec["ephemeralContainers"] = [{"name": "debug", "image": "x"}]
    errors = check_restricted(spec)
    assert any("ephemeralContainer 'debug': securityContext.allowPrivilegeEscalation" in e for e in errors)
    assert any("ephemeralContainer 'debug': securityContext.capabilities.drop" in e for e in errors)


def test_windows_pods_skip_linux_only_rules() -> None:
    spec = good_spec()
    spec["os"] = {"name": "windows"}
    for c in spec["initContainers"] + spec["containers"]:
        c["securityContext"] = {}
    assert check_restricted(spec) == []


def test_legacy_apparmor_annotation() -> None:
    ann = {"container.apparmor.security.beta.kubernetes.io/main": "unconfined"}
    assert any("unconfined" in e for e in check_restricted(good_spec(), annotations=ann))
    ok = {"container.apparmor.security.beta.kubernetes.io/main": "runtime/default"}
    assert check_restricted(good_spec(), annotations=ok) == []


def test_pod_specs_in_finds_every_kind() -> None:
    spec = good_spec()
    tmpl = {"metadata": {"labels": {"a": "b"}}, "spec": spec}
    objs = [
        {"kind": "Pod", "metadata": {"name": "p"}, "spec": spec},
        {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": tmpl}},
        {"kind": "Job", "metadata": {"name": "j"}, "spec": {"template": tmpl}},
        {"kind": "CronJob", "metadata": {"name": "c"}, "spec": {"jobTemplate": {"spec": {"template": tmpl}}}},
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": "pt"},
            "spec": {
                "pytorchReplicaSpecs": {
                    "Master": {"replicas": 1, "template": copy.deepcopy(tmpl)},
                    "Worker": {"template": copy.deepcopy(tmpl)},
                }
            },
        },
        {"kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {}},
    ]
    found = pod_specs_in({"kind": "List", "items": objs})
    wheres = [w for w, _ in found]
    assert wheres == [
        "Pod/p spec",
        "Deployment/d spec.template.spec",
        "Job/j spec.template.spec",
        "CronJob/c spec.jobTemplate.spec.template.spec",
        "PyTorchJob/pt spec.pytorchReplicaSpecs.Master.template.spec",
        "PyTorchJob/pt spec.pytorchReplicaSpecs.Worker.template.spec",
    ]
    assert all(s == spec for _, s in found)
    bad = copy.deepcopy(objs[4])
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["hostIPC"] = True
    errs = [e for w, s in pod_specs_in(bad) for e in check_restricted(s, w)]
    assert errs == ["PyTorchJob/pt spec.pytorchReplicaSpecs.Worker.template.spec: spec.hostIPC must be unset or false"]
