"""The launcher against a fake Kubernetes API over HTTP on 127.0.0.1: create -> running -> succeeded,
failure reasons, re-attach, recreate after failure, SIGTERM, transient errors, conflicts, operator missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_kube_api import FakeKubeApi
from pytorchjob_checks import admission_errors
from torchx.components.dist import torchrun

from kubellm.training.pytorchjob import (
    JobFailedError,
    OperatorNotInstalledError,
    build_pytorchjob,
    job_name,
    run_appdef,
)
from kubellm.training.pytorchjob.settings import ClusterLaunchSettings
from kubellm.training.pytorchjob.translate import JobContext

RUN_ID = "7c1d9e2a-3b4f-4a5c-8d6e-0f1a2b3c4d5e"
TASK = "pretrain"
NAME = job_name(RUN_ID, TASK)
FAST = {"poll_interval_s": 0.01, "api_backoff_s": 0.001, "request_timeout_s": 5, "delete_timeout_s": 5,
        "s3_secret_name": "kubellm-s3"}


def app():
    return torchrun("--config", "run.yaml", "--run-dir", "s3://bkt/runs/${app_id}", m="kubellm.training.worker",
                    image="img:1", j="2x2", cpu=4, gpu=0, memMB=4096)


@pytest.fixture
def fake():
    with FakeKubeApi(admission=admission_errors) as f:
        yield f


def launch(fake: FakeKubeApi, lines: list[str] | None = None, **settings):
    out = lines if lines is not None else []
    return run_appdef(app(), run_id=RUN_ID, task_name=TASK, namespace="default",
                      settings={**FAST, "api_host": fake.url, **settings}, sink=out.append)


def test_create_running_succeeded_streams_master_log(fake):
    fake.script(NAME, ["Created", {"phase": "Running", "log": ["step 1 loss 9.1"]}, "Running",
                       {"phase": "Running", "log": ["step 2 loss 7.3"]}, "Running", "Running",
                       {"phase": "Succeeded", "log": ["done"]}])
    lines: list[str] = []
    result = launch(fake, lines)
    assert result.phase == "Succeeded" and result.created and not result.reattached
    assert result.transitions == ["Created", "Running", "Succeeded"]
    assert len(fake.created) == 1 and fake.deletes == []
    logs = [ln for ln in lines if ln.startswith(f"[{NAME}-master-0]")]
    assert logs == [f"[{NAME}-master-0] step 1 loss 9.1", f"[{NAME}-master-0] step 2 loss 7.3",
                    f"[{NAME}-master-0] done"]  # each line once, in order, despite reconnects
    assert any("Created -> Running" in ln for ln in lines)


def test_failure_reports_condition_exit_code_termination_message_and_events(fake):
    fake.script(NAME, ["Created", "Running", {
        "phase": "Failed", "reason": "PyTorchJobFailed", "message": "PyTorchJob default/x is failed because 1 Master replica(s) failed.",
        "exit_code": 1, "termination_message": "Traceback (most recent call last):\nRuntimeError: loss is NaN at step 812",
        "event": ("PyTorchJobFailed", "job failed")}])
    with pytest.raises(JobFailedError) as e:
        launch(fake)
    msg = str(e.value)
    assert "Failed (PyTorchJobFailed: PyTorchJob default/x is failed because 1 Master replica(s) failed.)" in msg
    assert f"pod {NAME}-master-0 container pytorch: exit code 1" in msg
    assert "RuntimeError: loss is NaN at step 812" in msg
    assert "event PyTorchJob/" in msg
    assert e.value.result.failure and len(fake.created) == 1


def test_retry_reattaches_to_running_job(fake):
    ctx = JobContext(RUN_ID, TASK)
    s = ClusterLaunchSettings(**FAST)
    fake.preload(build_pytorchjob(app(), name=NAME, namespace="default", settings=s, ctx=ctx),
                 ["Running", "Running", {"phase": "Succeeded"}])
    lines: list[str] = []
    result = launch(fake, lines)
    assert result.reattached and not result.created and result.phase == "Succeeded"
    assert fake.count("POST", "/pytorchjobs") == 0 and fake.deletes == []
    assert any("re-attached to existing PyTorchJob" in ln for ln in lines)


def test_failed_job_is_recreated_on_retry_with_same_run_prefix(fake):
    ctx = JobContext(RUN_ID, TASK)
    first = build_pytorchjob(app(), name=NAME, namespace="default", settings=ClusterLaunchSettings(**FAST), ctx=ctx)
    fake.preload(first, ["Failed"])
    fake.script(NAME, ["Created", "Running", "Succeeded"])
    result = launch(fake)
    assert result.phase == "Succeeded" and result.recreated == 1 and result.attempt == 2
    assert fake.deletes == [NAME] and len(fake.created) == 1
    new = fake.created[0]
    assert new["metadata"]["annotations"]["kubellm.dev/attempt"] == "2"
    # identical command -> the engine finds the same run prefix and resumes from its last checkpoint
    cmd = lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]  # noqa: E731
    assert cmd(new) == cmd(first) and f"s3://bkt/runs/{NAME}" in cmd(new)


def test_recreate_on_failure_within_one_launch(fake):
    fake.script(NAME, ["Created", "Running", {"phase": "Failed", "exit_code": 137}])
    fake.script(NAME, ["Created", "Running", "Succeeded"])
    result = launch(fake, recreate_on_failure=1)
    assert result.phase == "Succeeded" and result.recreated == 1 and len(fake.created) == 2
    assert fake.deletes == [NAME]


def test_transient_errors_are_retried(fake):
    fake.inject("GET", "/apis/kubeflow.org/v1", 503, times=2)
    fake.inject("POST", "/pytorchjobs", 500, times=2)
    fake.inject("GET", f"/pytorchjobs/{NAME}", 429, times=3, retry_after=0.001)
    fake.inject("GET", "/pods", 502, times=1)
    result = launch(fake)
    assert result.phase == "Succeeded" and len(fake.created) == 1
    assert fake.count("POST", "/pytorchjobs") == 3


def test_transient_errors_give_up_with_a_clear_message(fake):
    from kubellm.training.pytorchjob.kube import KubeApiError

    fake.inject("GET", "/apis/kubeflow.org/v1", 500, times=100)
    with pytest.raises(KubeApiError, match=r"giving up after 3 attempts; last error HTTP 500"):
        launch(fake, api_retries=2)


RBAC_DENIED = ('pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:default:pipeline-runner" '
               'cannot create resource "pytorchjobs" in API group "kubeflow.org" in the namespace "default"')


@pytest.mark.parametrize("status, message, hint", [
    (403, RBAC_DENIED, r"lacks RBAC permission: the kubellm Helm chart's launcher Role"),
    (401, "Unauthorized", r"did not accept the credentials")])
def test_refused_credentials_say_where_permission_comes_from(fake, status, message, hint):
    """403/401 are answers, not faults: no retry, and the error says what to fix."""
    from kubellm.training.pytorchjob.kube import KubeApiError

    fake.inject("POST", "/pytorchjobs", status, times=1, message=message)
    with pytest.raises(KubeApiError, match=rf"create PyTorchJob default/{NAME}: HTTP {status} .*{hint}"):
        launch(fake)
    assert fake.count("POST", "/pytorchjobs") == 1


def test_a_403_that_is_not_rbac_gets_no_rbac_hint(fake):
    from kubellm.training.pytorchjob.kube import KubeApiError

    quota = 'pytorchjobs.kubeflow.org "x" is forbidden: exceeded quota: compute, requested: nvidia.com/gpu=8'
    fake.inject("POST", "/pytorchjobs", 403, times=1, message=quota)
    with pytest.raises(KubeApiError, match="exceeded quota") as err:
        launch(fake)
    assert "RBAC" not in str(err.value)


def test_conflict_on_create_attaches_to_the_concurrent_job(fake):
    ctx = JobContext(RUN_ID, TASK)
    job = build_pytorchjob(app(), name=NAME, namespace="default", settings=ClusterLaunchSettings(**FAST), ctx=ctx)
    # Our GET says "absent", then another attempt's create lands before ours: POST answers 409.
    fake.inject("GET", f"/pytorchjobs/{NAME}", 404, times=1)
    fake.preload(job, ["Running", "Succeeded"])
    result = launch(fake)
    assert result.reattached and result.phase == "Succeeded"
    assert fake.count("POST", "/pytorchjobs") == 1 and fake.created == [] and fake.deletes == []


def test_operator_not_installed(fake):
    fake.crd_installed = False
    with pytest.raises(OperatorNotInstalledError, match="Training Operator not installed.*kubeflow.org/v1 pytorchjobs"):
        launch(fake)
    assert fake.count("POST", "/pytorchjobs") == 0


def test_missing_secret_in_cluster_fails_fast_and_cleans_up(fake):
    fake.script(NAME, ["Created", {"phase": "Created",
                                   "waiting": ("CreateContainerConfigError", 'secret "kubellm-s3" not found')}])
    with pytest.raises(JobFailedError, match='CreateContainerConfigError: secret "kubellm-s3" not found'):
        launch(fake, config_error_grace_s=0)
    assert fake.deletes == [NAME]


def test_job_deleted_underneath_is_reported(fake):
    fake.script(NAME, ["Created", "Running", "Running", "Running"])
    import threading

    def delete_soon():
        while fake.count("GET", f"/pytorchjobs/{NAME}") < 4:
            time.sleep(0.005)
        with fake.lock:
            fake.jobs.pop(("default", NAME))

    t = threading.Thread(target=delete_soon)
    t.start()
    with pytest.raises(JobFailedError, match="JobDeleted"):
        launch(fake)
    t.join()


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from torchx.components.dist import torchrun
    from kubellm.training.pytorchjob import LaunchCancelledError, run_appdef
    settings = json.loads(sys.argv[1])
    app = torchrun("--config", "run.yaml", m="kubellm.training.worker", image="img:1", j="2x2", cpu=4, gpu=0, memMB=4096)
    try:
        run_appdef(app, run_id=sys.argv[2], task_name=sys.argv[3], namespace="default", settings=settings)
    except LaunchCancelledError as e:
        print("CANCELLED", e, flush=True)
        sys.exit(143)
    sys.exit(0)
    """
)


def test_sigterm_deletes_the_job_exactly_once(fake, tmp_path: Path):
    fake.script(NAME, ["Created"] + ["Running"] * 100_000)
    script = tmp_path / "launch.py"
    script.write_text(SIGTERM_SCRIPT)
    settings = {**FAST, "api_host": fake.url, "poll_interval_s": 0.05}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(settings), RUN_ID, TASK],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 40
        while fake.count("GET", f"/pytorchjobs/{NAME}") < 5:  # created and being watched
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "launcher never started watching"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # KFP may signal twice; still one delete
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "CANCELLED" in out and f"deleting PyTorchJob default/{NAME}" in out
    assert fake.deletes == [NAME]
    assert len(fake.created) == 1


def test_retry_after_success_reports_success_without_a_new_job(fake):
    ctx = JobContext(RUN_ID, TASK)
    job = build_pytorchjob(app(), name=NAME, namespace="default", settings=ClusterLaunchSettings(**FAST), ctx=ctx)
    fake.preload(job, ["Succeeded"])
    result = launch(fake)
    assert result.reattached and result.phase == "Succeeded"
    assert fake.count("POST", "/pytorchjobs") == 0 and fake.deletes == []


def _existing(run_id: str = RUN_ID, **settings) -> dict:
    s = ClusterLaunchSettings(**{**FAST, **settings})
    return build_pytorchjob(app(), name=NAME, namespace="default", settings=s, ctx=JobContext(run_id, TASK))


def _steps(phase: str) -> list[str]:
    return ["Running", "Succeeded"] if phase == "Running" else [phase]  # ends even when (wrongly) attached


@pytest.mark.parametrize("phase", ["Running", "Succeeded", "Failed"])
def test_job_of_another_run_with_the_same_name_is_not_touched(fake, phase):
    from kubellm.core.errors import KubellmError

    fake.preload(_existing(run_id="another-run"), _steps(phase))
    with pytest.raises(KubellmError, match="belongs to another run"):
        launch(fake, job_name=NAME)
    assert fake.count("POST", "/pytorchjobs") == 0 and fake.deletes == []


@pytest.mark.parametrize("phase", ["Running", "Succeeded"])
def test_live_or_succeeded_job_with_a_different_spec_is_not_attached(fake, phase):
    from kubellm.core.errors import KubellmError

    fake.preload(_existing(termination_grace_s=5), _steps(phase))
    with pytest.raises(KubellmError, match="runs a different spec"):
        launch(fake)
    assert fake.count("POST", "/pytorchjobs") == 0 and fake.deletes == []


def test_conflict_on_create_with_a_different_spec_is_not_attached(fake):
    from kubellm.core.errors import KubellmError

    fake.inject("GET", f"/pytorchjobs/{NAME}", 404, times=1)
    fake.preload(_existing(termination_grace_s=5), ["Running", "Succeeded"])
    with pytest.raises(KubellmError, match="runs a different spec"):
        launch(fake)
    assert fake.created == [] and fake.deletes == []


def test_failed_job_of_this_run_with_a_different_spec_is_recreated(fake):
    fake.preload(_existing(termination_grace_s=5), ["Failed"])
    result = launch(fake)
    assert result.phase == "Succeeded" and result.recreated == 1 and fake.deletes == [NAME]


def test_unschedulable_job_times_out_with_the_scheduler_reason_and_is_deleted(fake):
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    fake.script(NAME, ["Created", {"phase": "Created", "unschedulable": msg}])
    with pytest.raises(JobFailedError, match=r"cannot be scheduled(.|\n)*Insufficient nvidia.com/gpu"):
        launch(fake, unschedulable_timeout_s=0.05)
    assert fake.deletes == [NAME]


def test_unschedulable_timeout_none_keeps_waiting(fake):
    fake.script(NAME, ["Created"] + [{"phase": "Created", "unschedulable": "0/3 nodes are available"}] * 20
                + ["Running", "Succeeded"])
    result = launch(fake, unschedulable_timeout_s=None)
    assert result.phase == "Succeeded" and fake.deletes == []


def test_missing_namespace_is_named_not_reported_as_operator_missing(fake):
    from kubellm.core.errors import ConfigError

    fake.namespaces = {"default"}
    with pytest.raises(ConfigError, match="namespace 'no-such-ns' does not exist"):
        run_appdef(app(), run_id=RUN_ID, task_name=TASK, namespace="no-such-ns",
                   settings={**FAST, "api_host": fake.url})
    assert fake.created == []
