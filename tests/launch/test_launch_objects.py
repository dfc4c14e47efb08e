"""Every PyTorchJob the launcher can produce (a matrix of settings) is an object the cluster accepts:
the CRD's openAPIV3Schema (unknown fields refused), the operator's admission rules, Pod Security
`restricted`, a read-only root with writable emptyDirs, no unexpanded macro and no secret value."""

from __future__ import annotations

import itertools
import json

import pytest
from pytorchjob_checks import CRD_PATH, admission_errors, crd_schema, layout_errors, schema_errors
from torchx.components.dist import torchrun
from torchx.specs import AppDef, Resource, Role

from kubellm.core.podsecurity import check_restricted, pod_specs_in
from kubellm.training.pytorchjob import ClusterLaunchSettings, JobContext, build_pytorchjob, job_name

RUN_ID = "0f6a3d7e-5b1c-4c8e-a2f9-7d3e1b2c4a5f"
PLANTED = "planted-do-not-leak-9f8e7d"


def appdefs() -> dict[str, AppDef]:
    shell = Role(name="sh", image="img:2", entrypoint="bash", args=["-c", "echo ${app_id} && python -m m"],
                 num_replicas=2, resource=Resource(cpu=1, gpu=0, memMB=1024))
    return {
        "1x1-cpu": torchrun("--c", "x", m="kubellm.training.worker", image="img:1", j="1x1", cpu=2, gpu=0, memMB=2048),
        "2x8-gpu": torchrun("--c", "x", m="kubellm.training.worker", image="img:1", j="2x8", cpu=96, gpu=8, memMB=900_000),
        "elastic-1:4x2": torchrun("--c", "x", script="train.py", image="img:1", j="1:4x2", cpu=8, gpu=2, memMB=16000),
        "shell": AppDef("s", roles=[shell]),
    }


MATRIX = {
    "topology": ["auto", "elastic"],
    "settings": [
        {},
        {"s3_secret_name": None, "s3_workload_identity": True, "service_account": "kubellm-train",
         "s3_endpoint_url": "http://minio.minio:9000"},
        {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
         "priority_class": "batch-high", "image_pull_secrets": ["regcred"], "labels": {"team": "llm"},
         "staging": {"kind": "ephemeral", "size": "1Ti", "storage_class": "local-nvme"},
         "restart_policy": "OnFailure", "clean_pod_policy": "None", "ttl_seconds_after_finished": None,
         "active_deadline_seconds": 3600, "backoff_limit": 0, "shm_size": "32Gi", "cpu_limit": False},
        {"image": "registry.example/kubellm-train@sha256:" + "a" * 64, "staging": {"kind": "emptyDir", "size": None},
         "s3_config_map": "kubellm-s3", "run_as_user": 65532, "run_as_group": 65532, "fs_group": 65532},
        {"run_as_user": None, "run_as_group": None, "fs_group": None},  # OpenShift assigns them
    ],
    "owner": [False, True],
}


def matrix():
    for (aname, app), topo, (i, extra), owner in itertools.product(
        appdefs().items(), MATRIX["topology"], enumerate(MATRIX["settings"]), MATRIX["owner"]
    ):
        settings = ClusterLaunchSettings(**{"s3_secret_name": "kubellm-s3", "topology": topo, **extra})
        ctx = JobContext(RUN_ID, f"task-{aname}", 1, "launcher-pod" if owner else None, "uid-1" if owner else None,
                         "ns" if owner else None)
        name = job_name(RUN_ID, f"{aname}-{i}")
        yield f"{aname}/{topo}/s{i}/owner={owner}", build_pytorchjob(app, name=name, namespace="ns", settings=settings, ctx=ctx)


JOBS = dict(matrix())


def test_matrix_is_broad():
    assert len(JOBS) == 4 * 2 * 5 * 2
    assert sum("ownerReferences" in j["metadata"] for j in JOBS.values()) == len(JOBS) // 2
    kinds = {tuple(sorted(j["spec"]["pytorchReplicaSpecs"])) for j in JOBS.values()}
    assert kinds == {("Master",), ("Master", "Worker"), ("Worker",)}


@pytest.mark.skipif(crd_schema() is None, reason=f"PyTorchJob CRD schema not found at {CRD_PATH} "
                    "(../shared/schemas/ relative to the repo); schema validation skipped")
def test_every_job_validates_against_the_crd_schema():
    failures = {k: errs for k, j in JOBS.items() if (errs := schema_errors(j))}
    assert not failures, json.dumps(failures, indent=1)[:3000]


@pytest.mark.skipif(crd_schema() is None, reason=f"PyTorchJob CRD schema not found at {CRD_PATH}")
def test_schema_check_catches_mistakes():
    job = json.loads(json.dumps(next(iter(JOBS.values()))))
    job["spec"]["runPolicy"]["backoffLimit"] = "three"
    job["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicyy"] = "Never"  # pruned silently by the server
    errs = " ".join(schema_errors(job))
    assert "backoffLimit" in errs and "restartPolicyy" in errs


def test_every_job_passes_operator_admission():
    failures = {k: errs for k, j in JOBS.items() if (errs := admission_errors(j))}
    assert not failures, failures


def test_admission_rules_catch_mistakes():
    job = json.loads(json.dumps(JOBS[next(k for k in JOBS if k.startswith("elastic"))]))
    job["metadata"]["name"] = "Bad_Name"
    job["spec"]["pytorchReplicaSpecs"]["Master"] = job["spec"]["pytorchReplicaSpecs"].pop("Worker")
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "main"
    errs = " ".join(admission_errors(job))
    for expected in ("DNS-1035", "must be 1", "named 'pytorch'", "Worker: must be configured if elastic"):
        assert expected in errs


def test_every_pod_template_passes_restricted_with_readonly_root():
    failures = {}
    for key, job in JOBS.items():
        errs = [e for where, spec in pod_specs_in(job) for e in check_restricted(spec, where)]
        home = "/home/kubellm"
        errs += layout_errors(job, home)
        if errs:
            failures[key] = errs
    assert not failures, failures


def test_hostpath_staging_is_flagged_by_restricted():
    app = appdefs()["1x1-cpu"]
    job = build_pytorchjob(app, name="x", namespace="ns", ctx=JobContext(RUN_ID, "t"),
                           settings=ClusterLaunchSettings(s3_secret_name="s", staging={"kind": "hostPath"}))
    errs = [e for w, s in pod_specs_in(job) for e in check_restricted(s, w)]
    assert any("hostPath volumes are forbidden" in e for e in errs)


def test_no_macro_survives_and_no_secret_value(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PLANTED)
    jobs = dict(matrix())  # rebuilt with the planted credentials in the launcher's environment
    for key, job in jobs.items():
        text = json.dumps(job)
        assert PLANTED not in text, key
        if not key.startswith("shell"):  # a user's bash -c script may use shell ${...} on purpose
            assert "${" not in text, key
        assert "${app_id}" not in text and "${replica_id}" not in text and "${rank0_env}" not in text


def test_operator_init_container_default_fails_restricted_our_template_passes():
    from kubellm.training.pytorchjob.operator import (
        RESTRICTED_INIT_CONTAINER_TEMPLATE,
        inject_init_containers,
    )

    job = JOBS[next(k for k in JOBS if k.startswith("2x8-gpu/auto"))]
    as_injected = inject_init_containers(job)  # what Training Operator v1.9 does by default
    errs = [e for w, s in pod_specs_in(as_injected) for e in check_restricted(s, w)]
    assert any("initContainer 'init-pytorch'" in e and "Worker" in e for e in errs)
    fixed = inject_init_containers(job, RESTRICTED_INIT_CONTAINER_TEMPLATE)
    init = fixed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["initContainers"]
    assert init[0]["name"] == "init-pytorch" and f"{job['metadata']['name']}-master-0" in init[0]["command"][2]
    assert not [e for w, s in pod_specs_in(fixed) for e in check_restricted(s, w)]
    # worker-only (elastic) jobs get no init container at all
    elastic = JOBS[next(k for k in JOBS if k.startswith("2x8-gpu/elastic"))]
    assert "initContainers" not in inject_init_containers(elastic)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
