"""A training job handed from a stage to its worker processes, and the launch that runs it.

    run_id, run_dir = run_dir_for("pretrain", inputs, root)   # <root>/runs/<run id>, or inputs["resume"]
    spec = JobSpec(stage="pretrain", config=cfg.model_dump(mode="json"), inputs=inputs, output=root,
                   run_dir=run_dir, prefix=content_prefix(...))
    manifest = launch_job(spec, cfg.launch)    # writes run_dir/job.json, launches, waits, reads result

Each worker (`python -m kubellm.training.worker --spec run_dir/job.json`) imports
`kubellm.<stage>.stage` and calls its `run_worker(spec) -> Manifest | None`; rank 0 writes the
stage's manifest to `run_dir/result.json`. A rank that fails writes its traceback to
`run_dir/errors/rank<N>.txt`, which `launch_job` puts into the error it raises.

The run id (`new_run_id`) is `<stage>-<$KUBELLM_RUN_ID>`, else `<stage>-kfp-<$KUBELLM_KFP_RUN_ID>` in
a KFP pipeline, else `<stage>-<content prefix hash>-w<world>` (the same training run again resumes it), else a fresh
timestamp id (each stage has its own run dir under one id); the cluster job's name derives from the same
id, so a KFP retry of a training task resumes its run dir and re-attaches to its PyTorchJob.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from kubellm.core.errors import ConfigError, InputDataError, KubellmError
from kubellm.core.images import pull_secret_names
from kubellm.core.manifest import Manifest
from kubellm.core.storage import join, redact, storage_for
from kubellm.training.config import LaunchConfig, ParallelConfig, TrainConfig
from kubellm.training.pytorchjob.settings import ClusterLaunchSettings

if TYPE_CHECKING:
    from kubellm.model.config import ModelConfig

JOB_FILE = "job.json"
RUN_ID_ENV = "KUBELLM_RUN_ID"
"""An explicit run id: the run dir is `<output>/runs/<id>` (tests, manual re-runs)."""
KFP_RUN_ID_ENV = "KUBELLM_KFP_RUN_ID"
"""The KFP run's id, injected into training tasks by the pipeline (downward API,
`pipelines/definitions.py`); every attempt (retry) of one task sees the same value."""
RESULT_FILE = "result.json"
ERRORS_DIR = "errors"


class TrainingFailedError(KubellmError):
    """The distributed training job failed; the message carries the failing rank's traceback tail."""


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: str = Field(description="stage name: kubellm.<stage>.stage runs in each worker")
    config: dict[str, Any] = Field(description="the stage's config section (JSON mode)")
    inputs: dict[str, str] = Field(default_factory=dict)
    output: str = Field(description="the storage root the stage publishes under")
    run_dir: str = Field(description="run-scoped prefix: checkpoints, metrics, job files")
    prefix: str = Field(default="", description="content-addressed prefix of the stage's artifact")
    parents: dict[str, str] = Field(default_factory=dict,
                                    description="the inputs' content digests (the artifact's parents)")

    @property
    def identity(self) -> dict[str, str]:
        """What a checkpoint in the run dir must have been trained on to be resumed: the stage and
        its inputs (the config may change, e.g. a larger train.max_steps to continue a run)."""
        return {"stage": self.stage, **{f"input:{k}": v for k, v in sorted(self.parents.items())}}

    @property
    def uri(self) -> str:
        return join(self.run_dir, JOB_FILE)

    def write(self) -> str:
        storage_for(self.uri).write_bytes(self.uri, self.model_dump_json(indent=2).encode())
        return self.uri

    @classmethod
    def read(cls, uri: str) -> JobSpec:
        return cls.model_validate_json(storage_for(uri).read_bytes(uri))


def env_run_id(stage: str) -> str | None:
    """The run id the environment fixes for `stage`, or None: `<stage>-<$KUBELLM_RUN_ID>`, else
    `<stage>-kfp-<$KUBELLM_KFP_RUN_ID>` — the same for every attempt of one KFP task, so a retry
    finds the same run dir (and resumes its checkpoints) and the same cluster job (re-attaches).
    Scoped by stage: SFT and DPO run under one `$KUBELLM_RUN_ID` never share a run dir."""
    if explicit := os.environ.get(RUN_ID_ENV, "").strip():
        return f"{stage}-{explicit}"
    if kfp := os.environ.get(KFP_RUN_ID_ENV, "").strip():
        return f"{stage}-kfp-{kfp}"
    return None


def new_run_id(stage: str, prefix: str | None = None, world: int | None = None) -> str:
    """The run id of a training run of `stage`: `env_run_id(stage)`; else, given the content prefix the
    run will publish to, `<stage>-<that prefix's hash>-w<world size>`, so running the same training
    again (same config, inputs and code, as many processes: `kubellm run --local` or a stage command
    after a crash or Ctrl-C) resumes its checkpoints, while any change trains afresh (the world size
    too: the content hash leaves `launch` out, and a checkpoint resumes only with its data-parallel
    degree); else a fresh `<stage>-<UTC timestamp>-<random>`."""
    if run_id := env_run_id(stage):
        return run_id
    if prefix:
        return f"{stage}-{prefix.rstrip('/').rsplit('/', 1)[-1]}" + (f"-w{world}" if world else "")
    return f"{stage}-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_dir_for(stage: str, inputs: Mapping[str, str], output: str, prefix: str | None = None,
                world: int | None = None) -> tuple[str, str]:
    """(run id, run dir) of a stage's training run: the run dir is `inputs["resume"]` when given —
    which must hold a committed checkpoint, else this is an error rather than a silent fresh start —
    or `<output>/runs/<new_run_id(stage, prefix, world)>`."""
    run_id = new_run_id(stage, prefix, world)
    resume = inputs.get("resume")
    if not resume:
        return run_id, join(output, "runs", run_id)
    from kubellm.training.checkpoint import CheckpointManager

    ckpts = join(resume, "checkpoints")
    if CheckpointManager(ckpts).latest() is None:
        raise InputDataError(
            f"--input resume={resume}: no committed checkpoint under {ckpts} (a run dir to resume holds "
            "checkpoints/step-<n>/_manifest.json); check the path, or leave out `resume` to train from scratch")
    return run_id, resume


def write_result(spec: JobSpec, manifest: Manifest) -> None:
    uri = join(spec.run_dir, RESULT_FILE)
    storage_for(uri).write_bytes(uri, manifest.to_json().encode())


ERROR_TIME_PREFIX = "failed_at_unix: "
"""The first line of an error file: when the rank caught its error (seconds since the epoch)."""


def write_error(spec: JobSpec, rank: int, text: str, at: float | None = None) -> None:
    """Write rank `rank`'s traceback to `run_dir/errors/rank<N>.txt`, headed by when it was caught, so
    `failure_message` can name the rank that failed first: the root cause, whose peers fail after it
    (a collective broken by its exit, a timeout)."""
    uri = join(spec.run_dir, ERRORS_DIR, f"rank{rank}.txt")
    at = time.time() if at is None else at
    try:  # a traceback can quote an endpoint URL with user:password@ (botocore's own messages)
        storage_for(uri).write_bytes(uri, f"{ERROR_TIME_PREFIX}{at:.6f}\n{redact(text)}".encode())
    except Exception:  # reporting must never hide the original error
        pass


def _error_order(name: str, text: str) -> tuple[float, int, str]:
    """Sort key of an error file: its failure time (a file without one last), then its rank number
    (rank10 after rank2), then its name."""
    first = text.split("\n", 1)[0]
    try:
        at = float(first.removeprefix(ERROR_TIME_PREFIX)) if first.startswith(ERROR_TIME_PREFIX) else math.inf
    except ValueError:
        at = math.inf
    digits = name.removeprefix("rank")
    return at, int(digits) if digits.isdigit() else sys.maxsize, name


def failure_message(spec: JobSpec, header: str, log_tail: str = "", lines: int = 30) -> str:
    """The traceback tail of the rank that failed first (by the time in its error file; its peers'
    errors — a broken collective, a timeout — usually follow from it), naming the other ranks that
    failed; else, when no rank wrote an error file, the job's log tail."""
    st = storage_for(spec.run_dir)
    errors: list[tuple[tuple[float, int, str], str]] = []
    try:
        for o in st.list(join(spec.run_dir, ERRORS_DIR)):
            name = o.relpath.rsplit("/", 1)[-1].removesuffix(".txt")
            text = st.read_bytes(o.uri).decode(errors="replace")
            errors.append((_error_order(name, text), text))
    except Exception:  # reporting must never hide the original error
        pass
    if errors:
        errors.sort(key=lambda e: e[0])
        (_, _, name), text = errors[0]
        body = text.split("\n", 1)[1] if text.startswith(ERROR_TIME_PREFIX) else text
        others = [e[0][2] for e in errors[1:]]
        also = (f" (failed first; also failed after it: {', '.join(others[:8])}"
                f"{f' and {len(others) - 8} more' if len(others) > 8 else ''})") if others else ""
        return f"{header} — {name}{also}:\n" + "\n".join(body.rstrip().splitlines()[-lines:])
    tail = redact("\n".join(log_tail.rstrip().splitlines()[-lines:]))
    return f"{header}; last output:\n{tail}" if tail else header


def clear_previous(spec: JobSpec) -> None:
    """Remove a previous attempt's result and error files (checkpoints are kept for resume). Run before
    a new job starts, never when a retry re-attaches to the job that wrote them."""
    st = storage_for(spec.run_dir)
    for o in st.list(join(spec.run_dir, ERRORS_DIR)):
        st.delete(o.uri)
    res = join(spec.run_dir, RESULT_FILE)
    if st.exists(res):
        st.delete(res)


def check_before_launch(stage: str, model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                        launch: LaunchConfig) -> None:
    """Run the checks every worker runs at start-up (`train.seq_len` within the model's positions,
    `topology.validate_layout`, `dsconfig.deepspeed_config`) here, before any process is launched or anything is written, so a
    layout / ZeRO / precision combination that cannot work is refused by the stage itself rather
    than by N workers after start-up. Needs only the configs and the model's shape."""
    from kubellm.training.dsconfig import data_parallel_size, deepspeed_config
    from kubellm.training.pipeline import PIPELINE_STAGES, no_pipeline_error
    from kubellm.training.topology import validate_layout

    if train_cfg.device == "cpu" and launch.gpu > 0:
        raise ConfigError(
            f"{stage}: launch.gpu={launch.gpu} with train.device=cpu: every replica would hold GPUs it never "
            "uses; set launch.gpu: 0 to train on CPU, or train.device: cuda (or auto) to train on the GPUs")
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"{stage}: {stage}.train.seq_len={train_cfg.seq_len} exceeds the model's max_seq_len="
                          f"{model_cfg.max_seq_len}; lower {stage}.train.seq_len to at most {model_cfg.max_seq_len}")
    world = launch.nproc_per_node * launch.nnodes
    from kubellm.training.metrics import env_peak_tflops

    env_peak_tflops()  # the workers read it for MFU: a bad value fails here, before any launch
    try:
        device = _worker_device(train_cfg, launch)
        if launch.backend == "local" and launch.gpu > 0 and device == "cpu":
            raise ConfigError(
                f"launch.gpu={launch.gpu}, but this machine has no CUDA device and the local launcher's "
                "workers run here: they would train on CPU; set launch.gpu: 0, or launch.backend: pytorchjob "
                "to train on a cluster's GPUs")
        data_parallel_size(parallel_cfg, world)  # the clearer message for a dp × tp × pp mismatch
        layout = validate_layout(model_cfg, train_cfg, parallel_cfg, world)
        deepspeed_config(train_cfg, layout, world, device, model_cfg)
    except ConfigError as e:
        raise ConfigError(f"{stage}: {e}") from None
    if parallel_cfg.pp > 1 and stage not in PIPELINE_STAGES:
        raise ConfigError(f"{stage}: {no_pipeline_error(stage)}")


def _worker_device(train_cfg: TrainConfig, launch: LaunchConfig) -> str:
    """The device the workers will resolve `train.device` to, as far as the launcher can tell."""
    if launch.backend == "local":
        from kubellm.training.process_group import resolve_device

        return resolve_device(train_cfg.device)  # the workers run on this machine
    if train_cfg.device == "cuda" and launch.gpu == 0:
        raise ConfigError("train.device=cuda with launch.gpu=0: the pods get no GPU; set launch.gpu to the GPUs "
                          "per pod (≥ launch.nproc_per_node), or train.device: cpu")
    if train_cfg.device != "auto":
        return train_cfg.device
    return "cuda" if launch.gpu > 0 else "cpu"  # pods: auto is CUDA where the pod is given GPUs


def cluster_defaults(cluster: ClusterLaunchSettings, env: Mapping[str, str] | None = None) -> ClusterLaunchSettings:
    """`cluster` with what the compiled pipeline told its training step (`KUBELLM_S3_SECRET_NAME`,
    `KUBELLM_S3_SECRET_KEYS`, `KUBELLM_S3_CONFIG_MAP`, `KUBELLM_IMAGE_PULL_SECRETS`, the names its own
    pod uses) filling the S3 and pull-Secret settings the run config leaves unset, so the PyTorchJob's
    workers reach the same bucket and registry the same way. Values set in `launch.cluster` win; an
    empty name means none."""
    env = os.environ if env is None else env
    update: dict[str, Any] = {}
    if cluster.s3_secret_name is None and not cluster.s3_workload_identity and env.get("KUBELLM_S3_SECRET_NAME"):
        update["s3_secret_name"] = env["KUBELLM_S3_SECRET_NAME"]
        keys = [k.strip() for k in env.get("KUBELLM_S3_SECRET_KEYS", "").split(",")]
        if len(keys) == 2 and all(keys):
            update["s3_access_key_key"], update["s3_secret_key_key"] = keys
    if cluster.s3_config_map is None and env.get("KUBELLM_S3_CONFIG_MAP"):
        update["s3_config_map"] = env["KUBELLM_S3_CONFIG_MAP"]
    pull = pull_secret_names(env=env)
    if not cluster.image_pull_secrets and pull:  # the pipeline step's own pull Secrets
        update["image_pull_secrets"] = list(pull)
    if not update:
        return cluster
    from kubellm.core.config import validate

    return validate(type(cluster), {**cluster.model_dump(), **update},
                    "launch.cluster with KUBELLM_S3_SECRET_NAME / KUBELLM_S3_CONFIG_MAP from the pipeline step")


def launch_job(spec: JobSpec, launch: LaunchConfig, *, name: str | None = None) -> Manifest:
    """Launch `spec` with `launch.nproc_per_node × launch.nnodes` processes and wait for the result."""
    from kubellm.training.appdef import build_appdef

    uri = spec.write()
    appdef = build_appdef(uri, launch, name=name or f"{spec.stage}-job")
    header = f"{spec.stage} training failed"
    if launch.backend == "pytorchjob":
        from kubellm.training.pytorchjob import run_appdef  # the cluster launcher; heavy, so lazy

        # the job name derives from it: the same for every attempt of one KFP task (re-attach)
        run_id = env_run_id(spec.stage) or spec.run_dir.rstrip("/").rsplit("/", 1)[-1]
        try:
            # Results are cleared only when a job is actually created: a retry that re-attaches to the
            # earlier attempt's job (running, or already Succeeded) keeps what its rank 0 wrote.
            run_appdef(appdef, run_id=run_id, task_name=spec.stage, settings=cluster_defaults(launch.cluster),
                       before_create=lambda: clear_previous(spec))
        except KubellmError as e:
            raise TrainingFailedError(failure_message(spec, f"{header}: {e}")) from e
    else:
        from kubellm.training.launch_local import launch_local

        clear_previous(spec)
        result = launch_local(appdef, scheduler=launch.scheduler)
        if result.returncode != 0:
            raise TrainingFailedError(failure_message(spec, f"{header} (exit code {result.returncode})",
                                                      result.log_tail))
    res = join(spec.run_dir, RESULT_FILE)
    st = storage_for(res)
    if not st.exists(res):
        raise TrainingFailedError(f"{header}: the job finished but rank 0 wrote no {res}")
    return Manifest.from_json(st.read_bytes(res), source=res)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
