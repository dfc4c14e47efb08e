"""Launcher defects found in review, each pinned: backoffLimit 0 defeating the ExitCode restarts, elastic
pods running one process, a retry after success deleting the result it reports, a re-attached job left
owned only by the earlier attempt's pod, a job whose pods cannot be created waiting forever, an S3
endpoint's password written into the job, and memory quantities /dev/shm sizing could not read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_kube_api import FakeKubeApi
from pytorchjob_checks import admission_errors
from torchx.components.dist import torchrun

from kubellm.core.errors import ConfigError
from kubellm.training.pytorchjob import (
    ClusterLaunchSettings,
    JobContext,
    JobFailedError,
    JobLauncher,
    PyTorchJobBackend,
    build_pytorchjob,
    job_name,
    run_appdef,
)
from kubellm.training.pytorchjob.kube import KubeApi
from kubellm.training.pytorchjob.translate import _memory_mb

RUN_ID = "5d2c8e1f-7a3b-4c9d-8e0f-1a2b3c4d5e6f"
TASK = "pretrain"
NAME = job_name(RUN_ID, TASK)
FAST = {"poll_interval_s": 0.01, "api_backoff_s": 0.001, "request_timeout_s": 5, "delete_timeout_s": 5,
        "s3_secret_name": "kubellm-s3", "stream_logs": False}


def app(j: str = "2x2", gpu: int = 0):
    return torchrun("--config", "run.yaml", m="kubellm.training.worker", image="img:1", j=j, cpu=4, gpu=gpu,
                    memMB=4096)


def engine_appdef(**launch):
    from kubellm.training.appdef import build_appdef
    from kubellm.training.config import LaunchConfig

    lc = LaunchConfig(backend="pytorchjob", image="img:1", **{"nnodes": 2, "nproc_per_node": 2, **launch})
    return build_appdef("s3://bkt/runs/r1/job.json", lc, name="pretrain-job")


def build(appdef, namespace: str = "team-a", ctx: JobContext | None = None, **settings) -> dict:
    s = ClusterLaunchSettings(**{"s3_secret_name": "kubellm-s3", **settings})
    return build_pytorchjob(appdef, name="pretrain-abc", namespace=namespace, settings=s,
                            ctx=ctx or JobContext(RUN_ID, TASK))


def container(job: dict) -> dict:
    reps = job["spec"]["pytorchReplicaSpecs"]
    return reps.get("Master", reps.get("Worker"))["template"]["spec"]["containers"][0]


@pytest.fixture
def fake():
    with FakeKubeApi(admission=admission_errors) as f:
        yield f


@pytest.fixture
def no_pod_env(monkeypatch):
    for key in ("KUBELLM_POD_NAME", "KUBELLM_POD_UID", "KUBELLM_NAMESPACE", "KUBELLM_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# --- 1. runPolicy.backoffLimit and restartPolicy ---

@pytest.mark.parametrize("policy", ["ExitCode", "OnFailure"])
def test_backoff_limit_defaults_to_at_least_three_when_pods_restart(policy):
    appdef = engine_appdef()
    assert appdef.roles[0].max_retries == 0  # what TorchX's torchrun component always says
    job = build(appdef, restart_policy=policy)
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3
    assert {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} == {policy}


def test_backoff_limit_explicit_role_and_never():
    appdef = engine_appdef()
    assert build(appdef, backoff_limit=7)["spec"]["runPolicy"]["backoffLimit"] == 7
    assert build(appdef, backoff_limit=0)["spec"]["runPolicy"]["backoffLimit"] == 0  # asked for: kept
    assert build(appdef, restart_policy="Never")["spec"]["runPolicy"]["backoffLimit"] == 0
    appdef.roles[0].max_retries = 5
    assert build(appdef)["spec"]["runPolicy"]["backoffLimit"] == 5


def test_restart_policy_always_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"settings.restart_policy: .*never reaches Succeeded"):
        run_appdef(app(), run_id=RUN_ID, task_name=TASK, namespace="n",
                   settings={"s3_secret_name": "s", "api_host": "http://127.0.0.1:9", "restart_policy": "Always"})


# --- 2. elastic jobs: torchrun's process count ---

def _torchrun_sees(command: list[str], env: dict[str, str], monkeypatch) -> str:
    """--nproc-per-node torchrun resolves in the pod, given the PET_* env the operator injects."""
    from torch.distributed.run import get_args_parser

    for key in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return str(get_args_parser().parse_args(command[3:]).nproc_per_node)  # after `python -m kubellm.training.torchrun`


def test_elastic_worker_pods_run_nproc_per_node_processes(monkeypatch):
    job = build(engine_appdef(nnodes=2, nproc_per_node=8, gpu=8), topology="elastic")
    spec, cmd = job["spec"], container(job)["command"]
    assert spec["nprocPerNode"] == "8" and list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "8"
    ep = spec["elasticPolicy"]
    # v1.9's env for Worker-only elastic pods: no PET_NPROC_PER_NODE (only the deprecated nProcPerNode sets it)
    pet = {"PET_RDZV_ENDPOINT": "pretrain-abc-worker-0:23456", "PET_RDZV_BACKEND": ep["rdzvBackend"],
           "PET_NNODES": f"{ep['minReplicas']}:{ep['maxReplicas']}", "PET_MAX_RESTARTS": str(ep["maxRestarts"]),
           "PET_RDZV_ID": ep["rdzvId"]}
    assert _torchrun_sees(cmd, pet, monkeypatch) == "8"
    assert not admission_errors(job)


def test_master_worker_command_matches_spec_nproc(monkeypatch):
    job = build(app("2x4", gpu=4), nproc_per_node=2)
    cmd = container(job)["command"]
    assert job["spec"]["nprocPerNode"] == "2" and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert _torchrun_sees(cmd, {"PET_NPROC_PER_NODE": "2"}, monkeypatch) == "2"


# --- 3. a retry after success keeps the result it reports ---

def _launch_config(fake: FakeKubeApi):
    from kubellm.training.config import LaunchConfig

    return LaunchConfig(backend="pytorchjob", image="img:1", nnodes=1, nproc_per_node=1,
                        cluster=ClusterLaunchSettings(**{**FAST, "api_host": fake.url}))


def _spec_and_job(tmp_path: Path, fake: FakeKubeApi):
    from kubellm.training.appdef import build_appdef
    from kubellm.training.job import JobSpec, env_run_id
    from kubellm.training.pytorchjob import translate

    run_id = env_run_id(TASK)
    run_dir = tmp_path / "runs" / str(run_id)
    run_dir.mkdir(parents=True)
    launch = _launch_config(fake)
    spec = JobSpec(stage=TASK, config={}, output=str(tmp_path), run_dir=str(run_dir))
    spec.write()
    job = translate.build_pytorchjob(build_appdef(spec.uri, launch, name=f"{TASK}-job"),
                                     name=translate.job_name(str(run_id), TASK), namespace="default",
                                     settings=launch.cluster, ctx=translate.JobContext(str(run_id), TASK))
    return spec, launch, job, run_dir


def _result(run_dir: Path) -> str:
    from kubellm.core.manifest import Manifest

    text = Manifest(kind="checkpoint", uri=str(run_dir), counts={"steps": 812}).to_json()
    (run_dir / "result.json").write_text(text)
    return text


def test_retry_after_success_reads_the_earlier_attempts_result(fake, tmp_path, no_pod_env):
    from kubellm.training.job import launch_job

    no_pod_env.setenv("KUBELLM_KFP_RUN_ID", "run-abc")
    spec, launch, job, run_dir = _spec_and_job(tmp_path, fake)
    fake.preload(job, ["Succeeded"])  # attempt 1's launcher died; its job then succeeded
    _result(run_dir)
    manifest = launch_job(spec, launch)  # attempt 2 (KFP retry) re-attaches
    assert manifest.counts == {"steps": 812}
    assert fake.count("POST", "/pytorchjobs") == 0 and (run_dir / "result.json").exists()


def test_a_new_job_still_starts_without_the_previous_result(fake, tmp_path, no_pod_env):
    from kubellm.training.job import TrainingFailedError, launch_job

    no_pod_env.setenv("KUBELLM_KFP_RUN_ID", "run-abc")
    spec, launch, job, run_dir = _spec_and_job(tmp_path, fake)
    fake.preload(job, ["Failed"])  # attempt 1 failed after a stale result was left behind
    _result(run_dir)
    (run_dir / "errors").mkdir()
    (run_dir / "errors" / "rank0.txt").write_text("old traceback")
    with pytest.raises(TrainingFailedError, match="rank 0 wrote no"):
        launch_job(spec, launch)  # the recreated job succeeds (fake) without writing a result
    assert fake.count("POST", "/pytorchjobs") == 1
    assert not (run_dir / "result.json").exists() and not (run_dir / "errors" / "rank0.txt").exists()


# --- 4. a re-attached job gets the retry's pod as an owner ---

def _owned_by(pod: str, uid: str, namespace: str = "default") -> dict:
    s = ClusterLaunchSettings(**FAST)
    return build_pytorchjob(app(), name=NAME, namespace="default", settings=s,
                            ctx=JobContext(RUN_ID, TASK, 1, pod, uid, namespace))


def _launch(fake: FakeKubeApi, lines: list[str] | None = None, **settings):
    return run_appdef(app(), run_id=RUN_ID, task_name=TASK, namespace="default",
                      settings={**FAST, "api_host": fake.url, **settings},
                      sink=(lines if lines is not None else []).append)


def test_reattach_adds_this_pod_as_owner_idempotently(fake, no_pod_env):
    no_pod_env.setenv("KUBELLM_POD_NAME", "launcher-attempt2")
    no_pod_env.setenv("KUBELLM_POD_UID", "uid-attempt2")
    no_pod_env.setenv("KUBELLM_NAMESPACE", "default")
    fake.preload(_owned_by("launcher-attempt1", "uid-attempt1"), ["Running", "Running", "Succeeded"])
    fake.inject("PATCH", f"/pytorchjobs/{NAME}", 409, times=1)  # the job changed between our GET and PATCH
    result = _launch(fake)
    assert result.reattached and result.phase == "Succeeded"
    refs = fake.job(NAME)["metadata"]["ownerReferences"]
    assert [(r["name"], r["uid"]) for r in refs] == [("launcher-attempt1", "uid-attempt1"),
                                                      ("launcher-attempt2", "uid-attempt2")]
    assert all(r["controller"] is False and r["blockOwnerDeletion"] is False for r in refs)
    assert fake.count("PATCH", "/pytorchjobs") == 2  # the conflict was re-read and retried
    # the same pod attaching again (it restarted) patches nothing
    fake.preload(json.loads(json.dumps(fake.job(NAME))), ["Running", "Running", "Succeeded"])
    assert _launch(fake).reattached
    assert fake.count("PATCH", "/pytorchjobs") == 2


def test_reattach_without_patch_permission_warns_and_waits(fake, no_pod_env):
    no_pod_env.setenv("KUBELLM_POD_NAME", "launcher-attempt2")
    no_pod_env.setenv("KUBELLM_POD_UID", "uid-attempt2")
    no_pod_env.setenv("KUBELLM_NAMESPACE", "default")
    fake.preload(_owned_by("launcher-attempt1", "uid-attempt1"), ["Running", "Running", "Succeeded"])
    fake.inject("PATCH", "/pytorchjobs/", 403, times=1, message='User "x" cannot patch resource "pytorchjobs"')
    lines: list[str] = []
    assert _launch(fake, lines).phase == "Succeeded"
    assert any("needs `patch` on pytorchjobs" in ln for ln in lines) and fake.count("PATCH", "/pytorchjobs") == 1


def test_owner_only_in_the_launcher_pods_namespace(fake, no_pod_env):
    ctx = JobContext(RUN_ID, TASK, 1, "launcher", "uid-1", "kubeflow")
    assert "ownerReferences" not in build(app(), namespace="team-a", ctx=ctx)["metadata"]
    assert build(app(), namespace="kubeflow", ctx=ctx)["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # re-attaching from another namespace adds no owner either
    no_pod_env.setenv("KUBELLM_POD_NAME", "launcher-attempt2")
    no_pod_env.setenv("KUBELLM_POD_UID", "uid-attempt2")
    no_pod_env.setenv("KUBELLM_NAMESPACE", "kubeflow")
    fake.preload(_owned_by("launcher-attempt1", "uid-attempt1"), ["Running", "Running", "Succeeded"])
    assert _launch(fake).reattached
    assert fake.count("PATCH", "/pytorchjobs") == 0
    assert len(fake.job(NAME)["metadata"]["ownerReferences"]) == 1


# --- 5. pods the operator cannot create ---

QUOTA = 'Error creating: pods "x-master-0" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=8'
NO_PODS = {"phase": "Created", "no_pods": True, "event": ("FailedCreatePod", QUOTA)}


class Clock:
    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def _launcher(fake: FakeKubeApi, clock: Clock, **settings) -> tuple[JobLauncher, KubeApi]:
    s = ClusterLaunchSettings(**{**FAST, "api_host": fake.url, **settings})
    api = KubeApi.connect(fake.url, retries=s.api_retries, backoff_s=s.api_backoff_s, timeout_s=s.request_timeout_s)
    return JobLauncher(PyTorchJobBackend(api, "default", s), s, sink=lambda line: None, clock=clock), api


def test_pods_that_cannot_be_created_fail_after_the_grace_with_the_event(fake, no_pod_env):
    # without the check the job would wait here forever; the script ends so an old launcher ends too
    fake.script(NAME, ["Created", *[NO_PODS] * 20, "Running", "Succeeded"])
    launcher, api = _launcher(fake, Clock(10.0), config_error_grace_s=60)
    try:
        with pytest.raises(JobFailedError, match=r"cannot create its pods .*FailedCreatePod: .*exceeded quota") as e:
            launcher.launch(app(), JobContext(RUN_ID, TASK), NAME)
    finally:
        api.close()
    assert "event PyTorchJob/" in str(e.value) and fake.deletes == [NAME]
    polls = fake.count("GET", f"/pytorchjobs/{NAME}")
    assert 7 <= polls <= 10  # ~60 s of 10 s polls, not at once


def test_pods_created_within_the_grace_do_not_fail(fake, no_pod_env):
    fake.script(NAME, ["Created", *[NO_PODS] * 3, "Running", "Succeeded"])
    launcher, api = _launcher(fake, Clock(10.0), config_error_grace_s=60)
    try:
        assert launcher.launch(app(), JobContext(RUN_ID, TASK), NAME).phase == "Succeeded"
    finally:
        api.close()
    assert fake.deletes == []


def test_an_earlier_jobs_events_are_not_this_jobs(fake, no_pod_env):
    fake.events.append({"type": "Warning", "reason": "FailedCreatePod", "message": QUOTA,
                        "involvedObject": {"kind": "PyTorchJob", "name": NAME, "uid": "uid-of-a-deleted-job"}})
    fake.script(NAME, ["Created", *[{"phase": "Created", "no_pods": True}] * 3, "Running", "Succeeded"])
    assert _launch(fake, config_error_grace_s=0).phase == "Succeeded"
    assert fake.deletes == []


# --- 6. credentials in the S3 endpoint URL ---

def test_endpoint_url_with_credentials_is_refused_and_redacted():
    with pytest.raises(ConfigError, match=r"settings.s3_endpoint_url=.*\*\*\*@minio.*s3_secret_name") as e:
        build(app(), s3_endpoint_url="http://minio-admin:planted-pw-7c1d@minio.minio:9000")
    assert "planted-pw-7c1d" not in str(e.value) and "minio-admin" not in str(e.value)
    with pytest.raises(ConfigError, match="carries credentials") as e:
        build(app(), s3_endpoint_url="admin:planted-pw-7c1d@minio:9000")
    assert "planted-pw-7c1d" not in str(e.value)
    env = {v["name"]: v for v in container(build(app(), s3_endpoint_url="https://minio.minio:9000/"))["env"]}
    assert env["KUBELLM_S3_ENDPOINT_URL"]["value"] == "https://minio.minio:9000/"


# --- 7. memory quantities ---

@pytest.mark.parametrize("quantity, mib", [
    ("64Gi", 64 * 1024), ("2T", 2 * 10**12 // 2**20), ("1.5Ti", 1536 * 1024), ("1e9", 10**9 // 2**20),
    ("129E6", 129 * 10**6 // 2**20), ("500M", 500 * 10**6 // 2**20), ("1Pi", 2**30), ("2E", 2 * 10**18 // 2**20),
    ("1Ei", 2**40), ("512Mi", 512), ("0.5Gi", 512), (".25Gi", 256), ("1048576k", 1000),
    ("3221225472", 3072), ("1e-3", 0), ("1e-999999999", 0), ("1e999999999", None), ("lots", None), ("1.5", 0), ("5Gb", None),
])
def test_memory_quantities_parse_like_kubernetes(quantity, mib):
    assert _memory_mb(quantity) == mib


def test_shm_is_a_quarter_of_a_memory_setting_in_any_unit():
    role_without_memory = app()
    role_without_memory.roles[0].resource.memMB = -1
    job = build(role_without_memory, memory="2T")
    vols = {v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"]["sizeLimit"] == f"{2 * 10**12 // 2**20 // 4}Mi"
