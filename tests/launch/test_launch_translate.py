"""AppDef -> PyTorchJob translation: command rebuild, macros, resources, volumes, secrets, names, bad input."""

from __future__ import annotations

import json
import re

import pytest
from torchx.components.dist import torchrun
from torchx.specs import AppDef, Resource, Role

from kubellm.core.errors import ConfigError
from kubellm.training.pytorchjob import (
    ClusterLaunchSettings,
    JobContext,
    build_pytorchjob,
    job_name,
    run_appdef,
)
from kubellm.training.pytorchjob.translate import MAX_JOB_NAME, parse_command

RUN_ID = "8f4e2b7a-1c2d-4e5f-9a0b-123456789abc"
SETTINGS = {"s3_secret_name": "kubellm-s3", "s3_config_map": "kubellm-s3-config"}

# the PyTorchJob container starts torchrun through kubellm's exit-code wrapper (kubellm.training.torchrun)
TORCHRUN = ["python", "-m", "kubellm.training.torchrun"]


def app(j: str = "2x4", gpu: int = 4, **kw) -> AppDef:
    return torchrun("--config", "run.yaml", "--run-dir", "s3://bkt/runs/${app_id}", m="kubellm.training.worker",
                    image="registry.example/kubellm-train:1.0", j=j, cpu=16, gpu=gpu, memMB=64000, **kw)


def build(appdef: AppDef, **settings) -> dict:
    s = ClusterLaunchSettings(**{**SETTINGS, **settings})
    return build_pytorchjob(appdef, name="pretrain-abc", namespace="team-a", settings=s, ctx=JobContext(RUN_ID, "pretrain"))


def container(job: dict, rtype: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]


def env_of(c: dict) -> dict:
    return {e["name"]: e for e in c["env"]}


def test_master_workers_torchrun_rebuilt_from_operator_env():
    job = build(app("3x4"))
    reps = job["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "4" and "elasticPolicy" not in job["spec"]
    cmd = container(job)["command"]
    # rendezvous flags of the local command are gone: torchrun reads PET_* from the operator
    assert cmd[:9] == [*TORCHRUN, "--max-restarts", "3", "--monitor-interval", "5", "--nproc-per-node", "4"]
    assert cmd[9:] == ["-m", "kubellm.training.worker", "--config", "run.yaml", "--run-dir", "s3://bkt/runs/pretrain-abc"]
    assert not any(a.startswith("--rdzv") or a.startswith("--nnodes") for a in cmd)
    assert "${" not in json.dumps(job)
    c = container(job)
    assert c["name"] == "pytorch" and c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]


def test_elastic_when_min_replicas_below_replicas():
    job = build(app("1:4x2", gpu=2))
    spec = job["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"] and spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    ep = spec["elasticPolicy"]
    assert (ep["minReplicas"], ep["maxReplicas"], ep["rdzvBackend"], ep["maxRestarts"]) == (1, 4, "c10d", 3)
    assert env_of(container(job, "Worker"))["KUBELLM_RANK0_HOST"]["value"] == "pretrain-abc-worker-0"
    forced = build(app("2x2", gpu=2), topology="elastic")
    assert forced["spec"]["elasticPolicy"]["minReplicas"] == 2 and "Master" not in forced["spec"]["pytorchReplicaSpecs"]


def test_single_node_is_master_only():
    job = build(app("1x2", gpu=2))
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_macros_replaced_by_operator_env():
    role = Role(name="trainer", image="img:1", entrypoint="python",
                args=["-m", "kubellm.training.worker", "--id", "${app_id}", "--replica", "${replica_id}",
                      "--host", "$${${rank0_env}}", "--root", "${img_root}/x"],
                env={"TAG": "${app_id}-${replica_id}"}, num_replicas=2, resource=Resource(cpu=2, gpu=0, memMB=4096))
    job = build(AppDef("a", roles=[role]))
    c = container(job)
    assert c["command"][9:] == ["-m", "kubellm.training.worker", "--id", "pretrain-abc", "--replica",
                                "$(KUBELLM_REPLICA_ID)", "--host", "$(KUBELLM_RANK0_HOST)", "--root", "/x"]
    env = env_of(c)
    assert env["TAG"]["value"] == "pretrain-abc-$(KUBELLM_REPLICA_ID)"
    # $(VAR) only expands for variables defined earlier in the list
    names = [e["name"] for e in c["env"]]
    assert names.index("KUBELLM_REPLICA_ID") < names.index("TAG")
    assert env["KUBELLM_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['training.kubeflow.org/replica-index']")
    assert "${" not in json.dumps(job)


def test_unknown_macro_is_refused():
    role = Role(name="t", image="i", entrypoint="python", args=["-m", "m", "${nope}"])
    with pytest.raises(ConfigError, match=r"unknown TorchX macro \$\{nope\}"):
        build(AppDef("a", roles=[role]))


@pytest.mark.parametrize(
    "entrypoint,args,program",
    [
        ("torchrun", ["--nproc-per-node", "2", "train.py", "--x", "1"], (["train.py", "--x", "1"], 2)),
        ("python", ["-m", "torch.distributed.run", "--nproc_per_node=3", "-m", "pkg.mod"], (["-m", "pkg.mod"], 3)),
        ("python3", ["script.py", "a"], (["script.py", "a"], None)),
        ("/usr/bin/trainer", ["--fast"], (["--no-python", "/usr/bin/trainer", "--fast"], None)),
        ("bash", ["-c", "torchrun --nnodes 2 --nproc_per_node 8 --no-python ./bin --k v"],
         (["--no-python", "./bin", "--k", "v"], 8)),
    ],
)
def test_parse_command_variants(entrypoint, args, program):
    cmd = parse_command(entrypoint, args)
    assert (cmd.program, cmd.nproc_per_node) == program


def test_resources_placement_and_run_policy():
    job = build(app("2x8", gpu=8), node_gpus=8, node_selector={"node.kubernetes.io/instance-type": "p4d.24xlarge"},
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                priority_class="training-high", backoff_limit=5, clean_pod_policy="All", ttl_seconds_after_finished=3600,
                active_deadline_seconds=86400, max_restarts=2, pg_timeout_s=300)
    c = container(job, "Worker")
    res = c["resources"]
    assert res["requests"] == {"cpu": "16", "memory": "64000Mi", "nvidia.com/gpu": "8"}
    assert res["limits"] == res["requests"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["priorityClassName"] == "training-high"
    assert pod["automountServiceAccountToken"] is False
    assert job["spec"]["runPolicy"] == {"backoffLimit": 5, "cleanPodPolicy": "All", "ttlSecondsAfterFinished": 3600,
                                        "activeDeadlineSeconds": 86400}
    assert c["command"][3:5] == ["--max-restarts", "2"]
    env = env_of(c)
    assert env["KUBELLM_PG_TIMEOUT_S"]["value"] == "300" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    # /dev/shm in memory, a quarter of the pod's memory by default
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16000Mi"}


def test_pods_opt_out_of_the_istio_sidecar_unless_told_otherwise():
    # an injected istio-proxy keeps a finished pod Running, so the job would never succeed
    for kind in ("Master", "Worker"):
        meta = build(app("2x8", gpu=8))["spec"]["pytorchReplicaSpecs"][kind]["template"]["metadata"]
        assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}
    own = build(app("2x8", gpu=8), pod_annotations={"example.com/team": "nlp"})
    assert own["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["annotations"] == {
        "example.com/team": "nlp"}
    assert "annotations" not in build(app("2x8", gpu=8), pod_annotations={})["spec"]["pytorchReplicaSpecs"][
        "Master"]["template"]["metadata"]


def test_cpu_only_defaults_and_no_gpu_resource():
    role = Role(name="t", image="i", entrypoint="python", args=["-m", "m"], num_replicas=1)  # resource unset
    job = build(AppDef("a", roles=[role]), cpu="4", memory="8Gi", cpu_limit=False)
    res = container(job)["resources"]
    assert res == {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    assert job["spec"]["nprocPerNode"] == "1"


def test_staging_volume_kinds():
    job = build(app(), staging={"kind": "ephemeral", "size": "500Gi", "storage_class": "local-nvme"})
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "staging")
    spec = vol["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert spec["storageClassName"] == "local-nvme" and spec["resources"]["requests"]["storage"] == "500Gi"
    assert env_of(container(job))["KUBELLM_STAGING_DIR"]["value"] == "/var/kubellm/staging"
    hp = build(app(), staging={"kind": "hostPath", "host_path": "/mnt/nvme"})
    pod = hp["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "staging")["hostPath"]["path"] == "/mnt/nvme"


def test_s3_credentials_by_reference_only():
    job = build(app())
    c = container(job)
    env = env_of(c)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "kubellm-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kubellm-s3"
    assert all("value" not in env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    assert c["envFrom"] == [{"configMapRef": {"name": "kubellm-s3-config"}}]
    wi = build(app(), s3_secret_name=None, s3_workload_identity=True, s3_endpoint_url="http://minio:9000")
    env = env_of(container(wi))
    assert "AWS_SECRET_ACCESS_KEY" not in env and env["KUBELLM_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"


def test_credential_values_in_appdef_env_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY would put a credential value"):
        build(app(env={"AWS_SECRET_ACCESS_KEY": "planted-secret"}))


def test_owner_reference_from_downward_api_env(monkeypatch):
    monkeypatch.setenv("KUBELLM_POD_NAME", "llm-from-scratch-xyz-pretrain-123")
    monkeypatch.setenv("KUBELLM_POD_UID", "0b5c7e1e-0000-4000-8000-000000000001")
    monkeypatch.setenv("KUBELLM_NAMESPACE", "team-a")
    ctx = JobContext.from_env(RUN_ID, "pretrain")
    job = build_pytorchjob(app(), name="pretrain-abc", namespace="team-a",
                           settings=ClusterLaunchSettings(**SETTINGS), ctx=ctx)
    (ref,) = job["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "v1", "kind": "Pod", "name": "llm-from-scratch-xyz-pretrain-123",
                   "uid": "0b5c7e1e-0000-4000-8000-000000000001", "controller": False, "blockOwnerDeletion": False}
    monkeypatch.delenv("KUBELLM_POD_UID")
    assert "ownerReferences" not in build_pytorchjob(app(), name="x", namespace="n", settings=ClusterLaunchSettings(
        **SETTINGS), ctx=JobContext.from_env(RUN_ID, "pretrain"))["metadata"]


def test_job_name_is_stable_dns1035_and_short():
    long_task = "Pretrain_Model-" + "x" * 80
    for run_id, task in [(RUN_ID, "pretrain"), ("run-" + "9" * 90, long_task), ("123", "0-sft"), ("ÄÖ", "DPO!!")]:
        name = job_name(run_id, task)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= MAX_JOB_NAME
        assert len(f"{name}-worker-9999999") <= 63 and len(f"{name}-master-0") <= 63
        assert job_name(run_id, task) == name  # a retry derives the same name
    assert job_name(RUN_ID, "pretrain") != job_name(RUN_ID, "sft")
    # same truncated slugs, different full inputs -> different names (hash suffix)
    assert job_name(RUN_ID, long_task) != job_name(RUN_ID, long_task + "y")


def _pod_and_container_security(job: dict) -> tuple[dict, dict]:
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return pod["securityContext"], pod["containers"][0]["securityContext"]


def test_security_context_defaults_to_the_images_uid():
    pod, c = _pod_and_container_security(build(app()))
    assert pod == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 0, "fsGroup": 0,
                   "seccompProfile": {"type": "RuntimeDefault"}}
    assert (c["runAsNonRoot"], c["runAsUser"], c["runAsGroup"]) == (True, 10001, 0)


def test_uid_gid_and_fs_group_can_be_left_to_the_platform():
    """OpenShift restricted-v2 assigns the UID and fsGroup from the namespace's range and refuses
    fixed ones outside it: None leaves them out, runAsNonRoot stays, Pod Security `restricted` holds."""
    from kubellm.core.podsecurity import check_restricted

    job = build(app(), run_as_user=None, run_as_group=None, fs_group=None)
    pod, c = _pod_and_container_security(job)
    assert pod == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["runAsNonRoot"] is True and not {"runAsUser", "runAsGroup", "fsGroup"} & set(c)
    for rspec in job["spec"]["pytorchReplicaSpecs"].values():
        assert check_restricted(rspec["template"]["spec"], "pytorchjob") == []
    pod, c = _pod_and_container_security(build(app(), run_as_user=None, fs_group=None))
    assert "runAsUser" not in pod and "fsGroup" not in pod and pod["runAsGroup"] == c["runAsGroup"] == 0
    with pytest.raises(Exception, match="run_as_user"):
        ClusterLaunchSettings(run_as_user=0)


# --- bad input: refused before any request, naming the field ---

def test_more_gpus_than_node_type_has():
    with pytest.raises(ConfigError, match=r"resource.gpu=8 GPUs per pod.*settings.node_gpus=4"):
        build(app("2x8", gpu=8), node_gpus=4)


def test_more_processes_than_gpus():
    with pytest.raises(ConfigError, match="8 processes per pod but only resource.gpu=4"):
        build(app("2x4", gpu=4), nproc_per_node=8)


def test_missing_secret_name():
    with pytest.raises(ConfigError, match="settings.s3_secret_name is not set"):
        build(app(), s3_secret_name=None)


@pytest.mark.parametrize(
    "settings,field",
    [
        ({"job_name": "Pretrain_Job"}, "settings.job_name"),
        ({"job_name": "a" * 49}, "settings.job_name"),
        ({"labels": {"team/": "x"}}, "settings.labels"),
        ({"labels": {"team": "has space"}}, "settings.labels"),
        ({"pod_annotations": {"bad key!": "x"}}, "settings.pod_annotations"),
        ({"s3_secret_name": "Bad_Secret"}, "settings.s3_secret_name"),
        ({"node_selector": {"a/b/c": "x"}}, "settings.node_selector"),
        ({"shm_size": "lots"}, "settings.shm_size"),
        ({"topology": "ring"}, "settings.topology"),
        ({"no_such_key": 1}, "settings.no_such_key"),
    ],
)
def test_invalid_settings_name_the_field(settings, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        run_appdef(app(), run_id=RUN_ID, task_name="pretrain", namespace="n",
                   settings={**SETTINGS, "api_host": "http://127.0.0.1:9", **settings})


def test_trainjob_backend_is_a_clear_not_yet():
    with pytest.raises(ConfigError, match="settings.backend='trainjob'.*LaunchBackend"):
        run_appdef(app(), run_id=RUN_ID, task_name="pretrain", namespace="n",
                   settings={**SETTINGS, "api_host": "http://127.0.0.1:9", "backend": "trainjob"})


def test_several_roles_refused():
    r = Role(name="a", image="i", entrypoint="python", args=["-m", "m"])
    with pytest.raises(ConfigError, match="exactly one role, got 2"):
        build(AppDef("two", roles=[r, r]))


def test_engine_appdef_translates_and_keeps_its_max_restarts():
    from kubellm.training.appdef import build_appdef
    from kubellm.training.config import LaunchConfig

    launch = LaunchConfig(backend="pytorchjob", nnodes=2, nproc_per_node=2, gpu=2, image="img:1", max_restarts=5)
    appdef = build_appdef("s3://bkt/runs/r1/job.json", launch, name="pretrain-r1")
    job = build(appdef)
    cmd = container(job)["command"]
    assert cmd[3:5] == ["--max-restarts", "5"] and job["spec"]["nprocPerNode"] == "2"
    assert cmd[-4:] == ["-m", "kubellm.training.worker", "--spec", "s3://bkt/runs/r1/job.json"]
    assert "${" not in json.dumps(job)
    assert container(build(app()))["command"][3:5] == ["--max-restarts", "3"]  # cluster default
