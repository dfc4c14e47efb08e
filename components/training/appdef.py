"""The one description of a distributed training job: a TorchX `AppDef`.

    appdef = build_appdef("s3://b/kubellm/runs/r1/job.json", launch_cfg, name="pretrain-r1")
    launch_local(appdef)                                       # N local processes (torchrun)
    kubellm.training.pytorchjob.run_appdef(appdef, ...)        # the same job as a PyTorchJob

It is TorchX's own `dist.torchrun` component (one role, `bash -c "torchrun ... -m
kubellm.training.worker --spec URI"`), so TorchX schedulers, the PyTorchJob translator and a person
reading it all see the standard shape. `nproc_per_node` is in torchrun's arguments and, for
translators that prefer not to parse them, in `metadata["kubellm/nproc_per_node"]`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torchx import specs
from torchx.components.dist import torchrun

from kubellm.core.images import TRAIN_IMAGE_ENV, image_for
from kubellm.training.config import LaunchConfig

WORKER_MODULE = "kubellm.training.worker"
# torchrun's agent shares its rendezvous TCPStore with the workers by default; after a
# `--max-restarts` restart the new workers can read the previous attempt's keys and dial a dead
# gloo/NCCL port (pytorch/pytorch#135712; reproduced by tests/reliability/test_rel_kill_resume.py).
# A fresh store per attempt makes restarts work.
RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def build_appdef(spec_uri: str, launch: LaunchConfig, *, name: str = "kubellm-train",
                 env: Mapping[str, str] | None = None) -> specs.AppDef:
    """An AppDef whose every process runs `python -m kubellm.training.worker --spec <spec_uri>`."""
    safe = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50] or "kubellm-train"
    app = torchrun(
        "--spec", spec_uri,
        m=WORKER_MODULE,
        # the training image (pretrain/SFT/DPO share it): the one this pipeline step runs, as compiled
        image=launch.image or os.environ.get(TRAIN_IMAGE_ENV) or image_for("pretrain"),
        name=safe,
        cpu=launch.cpu,
        gpu=launch.gpu,
        memMB=launch.memory_mb,
        j=f"{launch.nnodes}x{launch.nproc_per_node}",
        env={**RESTART_SAFE_ENV, **launch.env, **dict(env or {})},
        metadata={"kubellm/nproc_per_node": str(launch.nproc_per_node),
                  "kubellm/max_restarts": str(launch.max_restarts)},
        tee=3,
    )
    if launch.max_restarts:
        role = app.roles[0]
        role.args = [a.replace("torchrun ", f"torchrun --max-restarts {launch.max_restarts} ", 1)
                     for a in role.args]
    return app
