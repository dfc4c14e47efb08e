"""Cluster training launch: a TorchX `AppDef` run as a Kubeflow `PyTorchJob` (Trainer v2 seam kept).

    from kubellm.training.pytorchjob import run_appdef
    run_appdef(appdef, run_id=kfp_run_id, task_name="pretrain", settings={"s3_secret_name": "kubellm-s3"})

Modules: `settings` (ClusterLaunchSettings), `translate` (AppDef -> PyTorchJob dict), `kube` (client
config + retries), `backend` (LaunchBackend, PyTorchJobBackend), `launcher` (JobLauncher, run_appdef).
"""

from kubellm.training.pytorchjob.backend import (
    BACKENDS,
    LaunchBackend,
    OperatorNotInstalledError,
    PyTorchJobBackend,
)
from kubellm.training.pytorchjob.launcher import (
    JobFailedError,
    JobLauncher,
    LaunchCancelledError,
    LaunchResult,
    run_appdef,
)
from kubellm.training.pytorchjob.settings import ClusterLaunchSettings, StagingVolume
from kubellm.training.pytorchjob.translate import JobContext, build_pytorchjob, job_name

__all__ = [
    "BACKENDS",
    "ClusterLaunchSettings",
    "JobContext",
    "JobFailedError",
    "JobLauncher",
    "LaunchBackend",
    "LaunchCancelledError",
    "LaunchResult",
    "OperatorNotInstalledError",
    "PyTorchJobBackend",
    "StagingVolume",
    "build_pytorchjob",
    "job_name",
    "run_appdef",
]
