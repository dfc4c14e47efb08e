"""charts/kubellm rendered by the real Helm engine for every values file in tests/chart/values/.

Lint (strict), golden renders (regenerate: KUBELLM_UPDATE_GOLDEN=1 pytest tests/chart), Kubernetes
schema validation (kubernetes-validate, offline, strict), Pod Security `restricted` on every pod
template, the launcher Role's exact grants, the kfp-launcher ConfigMap's keys, and the values schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from chart_render import (
    CHART,
    NAMESPACE,
    VALUES_DIR,
    load_values,
    render_chart,
    render_objects,
    render_templates,
)

from kubellm.core.images import image_for
from kubellm.core.podsecurity import check_restricted, pod_specs_in

GOLDEN = Path(__file__).resolve().parent / "golden"
VALUES = sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))
# A Kubernetes version kubernetes-validate ships schemas for (offline); the chart needs >= 1.27.
KUBE_VERSION = "1.34.0"

# Everything the PyTorchJob launcher may do: (apiGroup, resource) -> verbs. Nothing else.
LAUNCHER_GRANTS: dict[tuple[str, str], set[str]] = {
    ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "delete", "patch"},
    ("kubeflow.org", "pytorchjobs/status"): {"get"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"list", "watch"},
}


@pytest.fixture(scope="module", params=VALUES)
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = load_values(request.param)
    return request.param, values, render_objects(values)


def test_values_files_cover_the_install_modes() -> None:
    assert {"default", "multi-user", "workload-identity", "gitops-enabled"} <= set(VALUES)


@pytest.mark.parametrize("name", VALUES)
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, load_values(name), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", VALUES)
def test_render_matches_golden(name: str) -> None:
    text = render_chart(load_values(name))
    golden = GOLDEN / f"{name}.yaml"
    if os.environ.get("KUBELLM_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run KUBELLM_UPDATE_GOLDEN=1 pytest tests/chart"
    assert text == golden.read_text(), (
        f"render of {name}.yaml differs from {golden.name}; if intended: KUBELLM_UPDATE_GOLDEN=1 pytest tests/chart"
    )


def test_every_object_is_a_valid_kubernetes_object(rendered: tuple[str, dict, list[dict]]) -> None:
    name, _, objects = rendered
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def _pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    for obj in objects:
        yield from pod_specs_in(obj)


def test_every_pod_template_is_restricted_read_only_and_bounded(rendered: tuple[str, dict, list[dict]]) -> None:
    name, _, objects = rendered
    for where, spec in _pod_specs(objects):
        assert check_restricted(spec, f"{name}: {where}") == []
        assert spec.get("automountServiceAccountToken") is False, f"{where}: jobs need no API token"
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {c['name']} {kind}"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: HOME and caches live on /tmp, which must be writable"


def test_init_pytorch_template_is_restricted() -> None:
    objects = render_objects(load_values("gitops-enabled"))
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("pytorch-init-container")]
    assert cm["metadata"]["namespace"] == "kubeflow"
    text = cm["data"]["initContainer.yaml"]
    # the operator fills these Go-template fields; Helm must have left them alone
    for field in ("{{.InitContainerImage}}", "{{.MaxTries}}", "{{.MasterAddr}}"):
        assert field in text
    filled = (text.replace("{{.InitContainerImage}}", "alpine:3.20").replace("{{.MaxTries}}", "100")
              .replace("{{.MasterAddr}}", "job-master-0"))
    (init,) = yaml.safe_load(filled)
    assert init["name"] == "init-pytorch" and init["resources"]["limits"]
    worker = {"name": "pytorch", "image": "x", "securityContext": {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}}
    assert check_restricted({"initContainers": [init], "containers": [worker]}, "init-pytorch") == []


def test_launcher_role_grants_exactly_the_launcher_needs(rendered: tuple[str, dict, list[dict]]) -> None:
    name, values, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, f"{name}: no cluster-wide RBAC"
    roles = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "kubellm-launcher"]
    multi = values.get("pipelineRunner", {}).get("multiUser", {})
    namespaces = multi["namespaces"] if multi.get("enabled") else [NAMESPACE]
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    for role in roles:
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    assert "*" not in (group, res) and "*" not in rule["verbs"], f"{name}: wildcard in {rule}"
                    granted.setdefault((group, res), set()).update(rule["verbs"])
        assert granted == LAUNCHER_GRANTS, f"{name}: Role grants {granted}"


def test_role_is_bound_to_the_account_kfp_runs_pipelines_as(rendered: tuple[str, dict, list[dict]]) -> None:
    name, values, objects = rendered
    bindings = [o for o in objects if o["kind"] == "RoleBinding" and o["metadata"]["name"] == "kubellm-launcher"]
    multi = values.get("pipelineRunner", {}).get("multiUser", {})
    for b in bindings:
        ns = b["metadata"]["namespace"]
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubellm-launcher"}
        runner = b["subjects"][0]
        expect = "default-editor" if multi.get("enabled") else "pipeline-runner"
        assert runner == {"kind": "ServiceAccount", "name": expect, "namespace": ns}, name
    sa = values.get("serviceAccount", {})
    if sa.get("create"):
        (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
        assert account["metadata"]["annotations"] == sa["annotations"]
        subjects = [s for b in bindings for s in b["subjects"]]
        assert {"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE} in subjects


def test_kfp_launcher_configmap_uses_the_keys_kfp_reads(rendered: tuple[str, dict, list[dict]]) -> None:
    name, values, objects = rendered
    launchers = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher"]
    # off by default: KFP (standalone) or its profile controller (multi-user) already has one, and Helm
    # refuses to install over a ConfigMap it does not own
    assert bool(launchers) == bool(values.get("kfpLauncher", {}).get("create", False)), name
    s3 = values.get("s3", {})
    for cm in launchers:
        data = cm["data"]
        assert set(data) == {"defaultPipelineRoot", "providers"}
        assert data["defaultPipelineRoot"].startswith("s3://")
        providers = yaml.safe_load(data["providers"])
        default = providers["s3"]["default"]
        # field names of KFP's S3ProviderDefault / S3Credentials / S3SecretRef (backend/src/v2/config/s3.go)
        assert set(default) == {"endpoint", "region", "disableSSL", "forcePathStyle", "maxRetries", "credentials"}
        assert "://" not in default["endpoint"]
        creds = default["credentials"]
        secret = s3.get("credentials", {}).get("existingSecret")
        if secret and not s3.get("workloadIdentity", {}).get("enabled"):
            assert creds == {"fromEnv": False, "secretRef": {
                "secretName": secret,
                "accessKeyKey": s3["credentials"].get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"),
                "secretKeyKey": s3["credentials"].get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")}}
        else:
            assert creds == {"fromEnv": True}
        endpoint = s3.get("endpointUrl", "")
        assert default["disableSSL"] is endpoint.startswith("http://"), name


def test_env_configmap_matches_what_storage_and_images_read(rendered: tuple[str, dict, list[dict]]) -> None:
    name, values, objects = rendered
    envs = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kubellm-env"]
    assert NAMESPACE in {e["metadata"]["namespace"] for e in envs}
    s3 = values.get("s3", {})
    for cm in envs:
        data = cm["data"]
        assert data.get("KUBELLM_S3_ENDPOINT_URL", "") == s3.get("endpointUrl", "")
        assert data["AWS_REGION"] == s3.get("region", "us-east-1")
        assert data["KUBELLM_S3_RETRY_MODE"] in ("standard", "adaptive")
        # the chart's image references equal kubellm.core.images.image_for under the same settings
        env = {k: v for k, v in data.items() if k.startswith(("KUBELLM_REGISTRY", "KUBELLM_TAG", "KUBELLM_IMAGE_"))}
        for where, spec in _pod_specs(objects):
            for c in spec["containers"]:
                assert c["image"] == image_for("base", env=env), f"{name}: {where}"


@pytest.mark.parametrize("release", ["kubellm", "ml"])
def test_jobs_compile_pipelines_against_the_env_configmap_this_release_made(release: str) -> None:
    """`kubellm compile/submit/schedule` wire tasks to $KUBELLM_S3_CONFIG_MAP (else "kubellm-env"): the
    chart's ConfigMap carries its own name, so a release not called kubellm points tasks at one that exists."""
    objects = render_objects(load_values("gitops-enabled"), release=release)
    envs = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-env")}
    assert len(envs) == 1
    ((name, data),) = envs.items()
    assert data["KUBELLM_S3_CONFIG_MAP"] == name == ("kubellm-env" if release == "kubellm" else "ml-kubellm-env")
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert jobs
    for job in jobs:
        for c in job["spec"]["template"]["spec"]["containers"]:
            assert {"configMapRef": {"name": name}} in c["envFrom"], job["metadata"]["name"]


def test_pipelines_compiled_by_the_jobs_reference_the_credentials_secret_only_when_there_is_one() -> None:
    """`kubellm compile` falls back to a `kubellm-s3` Secret reference when KUBELLM_S3_SECRET_NAME is
    unset; with workload identity the chart sets it empty, so no task references a Secret."""
    for values, want in (("workload-identity", ""), ("gitops-enabled", None)):
        v = load_values(values)
        (cm,) = [o for o in render_objects(v) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kubellm-env"
                 and o["metadata"]["namespace"] == NAMESPACE]
        secret = v.get("s3", {}).get("credentials", {}).get("existingSecret", "")
        assert cm["data"]["KUBELLM_S3_SECRET_NAME"] == (want if want is not None else secret), values
        if want == "":
            assert v["s3"]["workloadIdentity"]["enabled"]


def test_jobs_carry_no_s3_credentials(rendered: tuple[str, dict, list[dict]]) -> None:
    """The submit and schedule jobs only call the KFP API: the S3 Secret reaches the pipeline's steps by
    name (KUBELLM_S3_SECRET_NAME), never the jobs' own environment."""
    name, _, objects = rendered
    assert not [o for o in objects if o["kind"] == "Secret"], "the chart never creates Secrets"
    for where, spec in _pod_specs(objects):
        env = {e["name"]: e for c in spec["containers"] for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key not in env, f"{name}: {where}"


def test_schedule_hook_runs_kubellm_schedule_idempotently() -> None:
    values = load_values("multi-user")
    objects = render_objects(values)
    (job,) = _jobs(objects)
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "post-install,post-upgrade"
    assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["kubellm", "schedule"]
    assert c["args"] == [
        "--endpoint=http://ml-pipeline.kubeflow.svc.cluster.local:8888", "--namespace=team-a",
        "--name=kubellm-evaluation-report", "--cron=0 30 2 * * *", "--run-config=/etc/kubellm/run-config.yaml",
    ]
    (cm,) = [o for o in objects if o["metadata"]["name"] == "kubellm-schedule-run-config"]
    assert yaml.safe_load(cm["data"]["run-config.yaml"]) == values["schedule"]["runConfig"]
    # helm uninstall deletes the recurring run it made (it kept firing the nightly report before), with
    # the same account, namespace and pod settings
    (gone,) = [o for o in objects if o["kind"] == "Job" and o not in _jobs(objects)]
    assert gone["metadata"]["name"] == "kubellm-schedule-delete"
    assert gone["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    (dc,) = gone["spec"]["template"]["spec"]["containers"]
    assert dc["command"] == ["kubellm", "schedule"] and dc["args"] == [
        "--endpoint=http://ml-pipeline.kubeflow.svc.cluster.local:8888", "--namespace=team-a",
        "--name=kubellm-evaluation-report", "--delete"]
    for key in ("serviceAccountName", "securityContext", "imagePullSecrets"):
        assert gone["spec"]["template"]["spec"].get(key) == job["spec"]["template"]["spec"].get(key), key
    assert [v["name"] for v in gone["spec"]["template"]["spec"]["volumes"]] == [
        v["name"] for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] != "run-config"]


def test_gitops_job_is_an_argocd_sync_hook_named_by_commit() -> None:
    values = load_values("gitops-enabled")
    sha = values["gitops"]["gitSha"]
    objects = render_objects(values)
    (job,) = [o for o in objects if o["kind"] == "Job"]
    assert job["metadata"]["name"] == f"kubellm-submit-{sha[:12]}"
    ann = job["metadata"]["annotations"]
    assert ann["argocd.argoproj.io/hook"] == "Sync" and ann["argocd.argoproj.io/sync-wave"] == "1"
    (cm,) = [o for o in objects if o["metadata"]["name"] == "kubellm-retrain-run-config"]
    assert cm["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "0"
    assert yaml.safe_load(cm["data"]["run-config.yaml"]) == values["gitops"]["runConfig"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["kubellm", "submit"]
    assert f"--git-sha={sha}" in c["args"] and "--run-config=/etc/kubellm/run-config.yaml" in c["args"]
    other = render_objects({**values, "gitops": {**values["gitops"], "gitSha": "0" * 40}})
    assert [o for o in other if o["kind"] == "Job"][0]["metadata"]["name"] == "kubellm-submit-000000000000"
    # only the hook carries the commit: a commit that changes other files renders the same ConfigMap, so
    # Argo CD finds the app in sync and starts no run (an annotation with the sha made every commit a sync)
    (other_cm,) = [o for o in other if o["metadata"]["name"] == "kubellm-retrain-run-config"]
    assert other_cm == cm


def test_multi_user_jobs_must_target_a_configured_profile_namespace() -> None:
    """A schedule in a namespace the chart does not configure would run its steps without the -env
    ConfigMap (read as optional: MinIO users silently talk to AWS) and without the launcher Role."""
    values = load_values("multi-user")
    configured = values["pipelineRunner"]["multiUser"]["namespaces"]
    with pytest.raises(helm.HelmError, match=r"submit runs to namespace \"team-elsewhere\", which is not in "
                                             r"pipelineRunner.multiUser.namespaces"):
        render_templates({**values, "schedule": {**values["schedule"], "namespace": "team-elsewhere"}})
    ok = render_objects({**values, "schedule": {**values["schedule"], "namespace": configured[0]}})
    assert any(o["kind"] == "Job" for o in ok)


def test_gitops_without_a_commit_sha_fails_with_a_message() -> None:
    with pytest.raises(helm.HelmError, match="gitops.gitSha"):
        render_templates({"gitops": {"enabled": True}})


def test_multi_user_without_namespaces_fails_with_a_message() -> None:
    with pytest.raises(helm.HelmError, match="multiUser.enabled needs pipelineRunner.multiUser.namespaces"):
        render_templates({"pipelineRunner": {"multiUser": {"enabled": True, "namespaces": []}}})


def _jobs(objects: list[dict]) -> list[dict]:
    """The Jobs that install or submit (not the schedule's pre-delete hook, which mirrors its pod spec)."""
    return [o for o in objects if o["kind"] == "Job"
            and o["metadata"].get("annotations", {}).get("helm.sh/hook") != "pre-delete"]


def test_multi_user_hook_jobs_need_an_account_that_exists_in_the_release_namespace() -> None:
    """default-editor exists only in profile namespaces: a hook Job in another namespace running as it
    could never create its pod, so the chart refuses that at render time."""
    multi = {"enabled": True, "namespaces": ["team-a", "team-b"]}
    base = {"pipelineRunner": {"multiUser": multi}, "schedule": {"enabled": True, "namespace": "team-a"}}
    for jobs in ({}, {"serviceAccountName": "default-editor"}):
        with pytest.raises(helm.HelmError, match=r'release namespace "kubeflow", where the ServiceAccount "default-editor" does not exist'):
            render_templates({**base, "jobs": jobs})
    with pytest.raises(helm.HelmError, match="serviceAccount.create=true"):
        render_templates({**base, "schedule": {"enabled": False},
                          "gitops": {"enabled": True, "gitSha": "abcdef0", "namespace": "team-a"}})

    def job_account(values: dict) -> str:
        (job,) = _jobs(render_objects(values))
        return job["spec"]["template"]["spec"]["serviceAccountName"]

    assert job_account({**base, "serviceAccount": {"create": True}}) == "kubellm"
    assert job_account({**base, "jobs": {"serviceAccountName": "kubellm-scheduler"}}) == "kubellm-scheduler"
    # released into a profile namespace: the account is there
    inside = {"pipelineRunner": {"multiUser": {**multi, "namespaces": ["kubeflow", "team-b"]}}, "schedule": {"enabled": True}}
    assert job_account(inside) == "default-editor"
    # no hook job, nothing to refuse
    assert not _jobs(render_objects({"pipelineRunner": {"multiUser": multi}}))


KFP_CLIENT_GRANTS = {("pipelines.kubeflow.org", r): {"get", "list", "create"}
                     for r in ("experiments", "runs", "pipelines", "pipelines/versions")}
# recurring runs: `kubellm schedule` also enables and disables them (KFP's API server authorizes those
# as the verbs "enable" / "disable" on `jobs`)
KFP_CLIENT_GRANTS[("pipelines.kubeflow.org", "jobs")] = {"get", "list", "create", "delete", "enable", "disable"}


def test_kfp_client_grants_cover_the_recurring_run_calls_schedule_makes() -> None:
    source = (CHART.parents[1] / "pipelines" / "schedule.py").read_text()
    verbs = KFP_CLIENT_GRANTS[("pipelines.kubeflow.org", "jobs")]
    for call, verb in (("enable_recurring_run", "enable"), ("disable_recurring_run", "disable"),
                       ("delete_recurring_run", "delete"), ("create_recurring_run", "create")):
        assert (call not in source) or verb in verbs, call


def _kfp_client_rbac(objects: list[dict]) -> dict[str, tuple[dict, dict]]:
    """namespace -> (Role, RoleBinding) of the hook jobs' KFP API access."""
    out: dict[str, list[dict]] = {}
    for o in objects:
        if o["kind"] in ("Role", "RoleBinding") and o["metadata"]["name"] == "kubellm-kfp-client":
            out.setdefault(o["metadata"]["namespace"], []).append(o)
    pairs = {}
    for ns, objs in out.items():
        (role,) = [o for o in objs if o["kind"] == "Role"]
        (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
        pairs[ns] = (role, binding)
    return pairs


def test_multi_user_hook_jobs_may_call_kfp_in_the_namespace_they_target() -> None:
    """Multi-user KFP runs a SubjectAccessReview on pipelines.kubeflow.org for every API call: the hook
    jobs' own account gets exactly the calls `kubellm schedule` / `kubellm submit --upload` make, bound in
    each namespace a job targets and nowhere else; single-user KFP and no hook job render none."""
    multi = {"enabled": True, "namespaces": ["team-a", "team-b"]}
    values = {"pipelineRunner": {"multiUser": multi}, "jobs": {"serviceAccountName": "kubellm-scheduler"},
              "schedule": {"enabled": True, "namespace": "team-a"},
              "gitops": {"enabled": True, "gitSha": "abcdef0", "namespace": "team-b"}}
    objects = render_objects(values)
    pairs = _kfp_client_rbac(objects)
    assert sorted(pairs) == ["team-a", "team-b"]
    accounts = {j["spec"]["template"]["spec"]["serviceAccountName"] for j in _jobs(objects)}
    assert accounts == {"kubellm-scheduler"}
    for ns, (role, binding) in pairs.items():
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    granted.setdefault((group, res), set()).update(rule["verbs"])
        assert granted == KFP_CLIENT_GRANTS, ns
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "kubellm-kfp-client"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubellm-scheduler",
                                        "namespace": NAMESPACE}], ns
    # both jobs at one namespace (the release's, by default, when it is a profile namespace): one Role there
    both_here = {**values, "pipelineRunner": {"multiUser": {**multi, "namespaces": ["team-a", NAMESPACE]}},
                 "schedule": {"enabled": True}, "gitops": {"enabled": True, "gitSha": "abcdef0"}}
    assert sorted(_kfp_client_rbac(render_objects(both_here))) == [NAMESPACE]
    # the chart's own account, when it creates one
    own = {**values, "jobs": {}, "serviceAccount": {"create": True}}
    assert {b["subjects"][0]["name"] for _, b in _kfp_client_rbac(render_objects(own)).values()} == {"kubellm"}
    # nothing to grant: single-user KFP, no hook job, or switched off
    single = {k: v for k, v in values.items() if k != "pipelineRunner"}
    assert not _kfp_client_rbac(render_objects(single))
    assert not _kfp_client_rbac(render_objects({"pipelineRunner": {"multiUser": multi}}))
    assert not _kfp_client_rbac(render_objects({**values, "rbac": {"kfpClient": False}}))
    assert not _kfp_client_rbac(render_objects({**values, "rbac": {"create": False}}))


def test_numbers_from_values_render_as_integers() -> None:
    """Helm reads numbers in values as float64; printed bare, 1000650000 (an OpenShift-range UID)
    would become 1.00065e+09, which the API server rejects."""
    values = {
        "schedule": {"enabled": True},
        "jobs": {"runAsUser": 1000650000, "runAsGroup": 1000650000,
                 "activeDeadlineSeconds": 2592000, "ttlSecondsAfterFinished": 31536000, "backoffLimit": 1000000},
        "trainingOperator": {"initContainerTemplate": {"create": True, "runAsUser": 1000650000}},
    }
    objects = render_objects(values)
    (job,) = _jobs(objects)
    assert job["spec"]["activeDeadlineSeconds"] == 2592000 and job["spec"]["ttlSecondsAfterFinished"] == 31536000
    assert job["spec"]["backoffLimit"] == 1000000
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["runAsGroup"] == 1000650000
    big_fs_group = render_objects({**values, "jobs": {"fsGroup": 1000650000}})
    assert _jobs(big_fs_group)[0]["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 1000650000
    assert spec["containers"][0]["securityContext"]["runAsUser"] == 1000650000
    (init_cm,) = [o for o in objects if o["metadata"]["name"].endswith("pytorch-init-container")]
    (init,) = yaml.safe_load(init_cm["data"]["initContainer.yaml"].replace("{{.", "x").replace("}}", "x"))
    assert init["securityContext"]["runAsUser"] == 1000650000


def test_uid_gid_and_fsgroup_can_be_left_to_the_platform() -> None:
    """OpenShift restricted-v2 assigns the UID and fsGroup and refuses fixed ones outside the
    namespace's range: null values leave them out, runAsNonRoot stays."""
    objects = render_objects(load_values("openshift"))
    (job,) = _jobs(objects)
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    sc = spec["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] is True and "runAsUser" not in sc and "runAsGroup" not in sc
    (init_cm,) = [o for o in objects if o["metadata"]["name"].endswith("pytorch-init-container")]
    (init,) = yaml.safe_load(init_cm["data"]["initContainer.yaml"].replace("{{.", "x").replace("}}", "x"))
    assert init["securityContext"]["runAsNonRoot"] is True and "runAsUser" not in init["securityContext"]
    # the defaults are unchanged
    (job,) = _jobs(render_objects({"schedule": {"enabled": True}}))
    assert job["spec"]["template"]["spec"]["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 0, "fsGroup": 0,
        "seccompProfile": {"type": "RuntimeDefault"}}


def test_templated_args_stay_one_string_each() -> None:
    """Unquoted, `--experiment=team: retrain #2` would be a YAML map (': ') cut at a comment (' #')."""
    values = {
        "kfp": {"endpoint": "https://kfp.example.com/pipeline #x"},
        "gitops": {"enabled": True, "gitSha": "abcdef0", "experiment": "team: retrain #2", "namespace": "team-a"},
        "schedule": {"enabled": True, "cron": "@every 6h", "namespace": "team-a"},
    }
    jobs = {j["metadata"]["annotations"]["helm.sh/hook-weight"]: j for j in _jobs(render_objects(values))}
    submit = jobs["10"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert submit == ["--endpoint=https://kfp.example.com/pipeline #x", "--namespace=team-a",
                      "--experiment=team: retrain #2", "--run-config=/etc/kubellm/run-config.yaml", "--git-sha=abcdef0"]
    schedule = jobs["5"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert schedule == ["--endpoint=https://kfp.example.com/pipeline #x", "--namespace=team-a",
                        "--name=kubellm-evaluation-report", "--cron=@every 6h", "--run-config=/etc/kubellm/run-config.yaml"]


def test_schedule_cron_forms_the_schema_accepts() -> None:
    for cron in ("0 0 3 * * *", "@daily", "@every 6h"):
        render_templates({"schedule": {"enabled": True, "cron": cron}})


def test_upgrade_render_equals_install_render() -> None:
    values = load_values("multi-user")
    install = render_templates(values)
    upgrade = render_templates(values, upgrade=True)
    assert {k: v for k, v in install.items() if "NOTES" not in k} == {k: v for k, v in upgrade.items() if "NOTES" not in k}


def _schema_objects(node: Any, path: str = "$") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            yield path, node
        for key, value in node.items():
            yield from _schema_objects(value, f"{path}.{key}")


def test_values_schema_closes_every_chart_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    objects = list(_schema_objects(schema))
    assert len(objects) > 15
    for path, node in objects:
        assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and v and k not in ("runConfig", "annotations", "commonLabels", "nodeSelector", "affinity"):
                out |= keys(v, prefix + k + ".")
        return out

    def schema_keys(node: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in node.get("properties", {}).items():
            out.add(prefix + k)
            out |= schema_keys(v, prefix + k + ".")
        return out

    assert keys(defaults) <= schema_keys(schema), "values.yaml has keys the schema does not describe"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"unknownKey": 1}, "additional properties 'unknownKey'"),
        ({"s3": {"endpointURL": "http://x"}}, "additional properties 'endpointURL'"),
        ({"jobs": {"resources": {"requests": {"cpu": "1", "memory": "1Gi", "gpu": 1}}}}, "gpu"),
        ({"s3": {"retryMode": "legacy"}}, "retryMode"),
        ({"jobs": {"runAsUser": 0}}, "runAsUser"),
        ({"images": {"digests": {"train": "sha256:abc"}}}, "train"),
        ({"kfpLauncher": {"defaultPipelineRoot": "/local/path"}}, "defaultPipelineRoot"),
        ({"schedule": {"enabled": True, "cron": "0 3 * * *"}}, "cron"),  # five fields: KFP's has six
    ],
)
def test_values_schema_rejects_bad_values(values: dict, where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=where):
        render_templates(values)


def test_defaults_validate_against_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)
        assert chart.values["rbac"]["create"] is True and chart.values["jobs"]["runAsUser"] >= 1000


def test_the_env_config_map_holds_every_key_a_pipeline_step_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps map each S3 setting from this ConfigMap; a backend that ignores `optional` fails a pod on a
    missing key, so every one is present ("" = kubellm's default), and the transfer tuning is settable."""
    from kubellm.core.storage import S3_ENV_VARS, S3Settings

    def settings(values: dict) -> S3Settings:
        (cm,) = [o for o in render_objects(values) if o["kind"] == "ConfigMap"
                 and o["metadata"]["name"] == "kubellm-env"]
        assert set(S3_ENV_VARS) <= set(cm["data"]), sorted(set(S3_ENV_VARS) - set(cm["data"]))
        for var in (*S3_ENV_VARS, "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(var, raising=False)
        for var in S3_ENV_VARS:
            monkeypatch.setenv(var, cm["data"][var])
        return S3Settings.from_env()

    assert settings({}) == S3Settings()  # the empty ones are kubellm's defaults
    tuned = settings({"s3": {"multipartThreshold": 134217728, "multipartChunksize": 33554432, "maxConcurrency": 16}})
    assert (tuned.multipart_threshold, tuned.multipart_chunksize, tuned.max_concurrency) == (134217728, 33554432, 16)
