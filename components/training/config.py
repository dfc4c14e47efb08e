"""Configs of the shared training engine (pretrain, SFT and DPO all use these)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from kubellm.core.config import StrictModel
from kubellm.core.errors import ConfigError
from kubellm.training.pytorchjob.settings import ClusterLaunchSettings
from kubellm.training.pytorchjob.translate import is_credential_env

Beta = Annotated[float, Field(ge=0, lt=1)]
"""An Adam beta: an exponential decay rate in [0, 1)."""


def _not_a_credential(key: str) -> str:
    # validates the env *key*: a refusal names `launch.env.<KEY>` and never echoes the value
    if is_credential_env(key):
        raise ValueError(
            f"{key} looks like a credential; launch.env is written in plain text to the run dir's job.json "
            "and the job spec. Reference it from a Kubernetes Secret instead (S3: "
            "launch.cluster.s3_secret_name) or, for local runs, export it in the launching environment "
            "(the workers inherit it)")
    return key


EnvKey = Annotated[str, AfterValidator(_not_a_credential)]


class OptimConfig(StrictModel):
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine decay floor as a fraction of `lr`."""
    warmup_steps: int = Field(default=10, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(default=0.1, ge=0, allow_inf_nan=False)
    """Decoupled weight decay (AdamW); not applied to norms, biases or embeddings."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW betas, each in [0, 1)."""
    eps: float = Field(default=1e-8, ge=0, allow_inf_nan=False)
    """AdamW epsilon (≥ 0)."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this (0 = off)."""
    decay_embeddings: bool = False
    """Apply weight decay to the token embedding (and a tied output head). Norm weights and biases
    never decay."""


class TrainConfig(StrictModel):
    max_steps: int = Field(default=100, ge=1)
    """Optimizer steps to train for."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = Field(default=16, ge=1)
    """Sequences per optimizer step across all ranks (= micro × grad-accum × dp)."""
    seq_len: int = Field(default=128, ge=8)
    """Tokens per training sequence (≤ the model's max_seq_len)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision: fp32 (CPU default), bf16, fp16."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    compile: bool = False
    """Compile the model's forward with torch.compile (`Module.compile`: parameter names unchanged).
    Off by default: on the 2-core CPU a compiled step is only ~1.1× eager (BENCHMARKS.md) and the
    compile itself takes minutes. Dense models only (parallel.tp = parallel.pp = 1)."""
    seed: int = 1234
    """Seed for initialisation, data order and dropout."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """ZeRO optimizer state CPU offload (stage ≥ 1)."""
    offload_params: bool = False
    """ZeRO-3 parameter CPU offload."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    log_every: int = Field(default=1, ge=1)
    """Log metrics every N steps."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Keep the last k committed checkpoints."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto = CUDA when available, else CPU (gloo)."""
    host_memory_reuse: bool = True
    """On CPU (glibc): keep freed activation memory in the process instead of returning it to the
    kernel and faulting it back in, zero-filled, every step (`kubellm.training.hostmem`; ~12,000 page
    faults per `seed` step otherwise). Process-wide; MALLOC_*_ environment variables win."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (`torch.use_deterministic_algorithms`); slower on GPU."""
    prefetch_batches: int = Field(default=4, ge=1)
    """Micro-batches the loader's background thread prepares ahead of the training step (pretrain's
    token-shard loader; SFT and DPO hold their examples in memory and do not use it)."""
    peak_tflops: float | None = Field(default=None, gt=0)
    """Per-device peak TFLOP/s used for MFU. None = a table for known GPUs, or on CPU the env var
    KUBELLM_PEAK_TFLOPS (no CPU peak is guessed; MFU is then not reported)."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0 (off in containers is fine: it only writes to stderr)."""
    tensorboard: bool = True
    """Write TensorBoard event files next to the JSONL metrics."""
    nonfinite: Literal["skip", "stop"] = "stop"
    """A NaN/Inf loss or gradient norm on any rank (every rank sees it before the optimizer step):
    `stop` fails the run before the update, so the last committed checkpoint is intact; `skip` drops
    that step's update on every rank and counts it (`skipped_nonfinite` in the metrics). Under fp16 a
    gradient overflow is the dynamic loss scaler's routine search for its scale: DeepSpeed skips the
    step and halves the scale (failing itself at its minimum); kubellm counts it as `skipped_overflow`."""
    spike_sigma: float | None = Field(default=None, gt=0)
    """Skip (and count as `skipped_spike`) a step whose loss is more than this many standard
    deviations above the mean of the last `spike_window` applied steps. None = off. A loss that stays
    above the threshold on more than 10 steps with no applied step between them is a shift, not a spike: the run stops (before
    the update) instead of skipping every later step."""
    spike_window: int = Field(default=50, ge=2)
    """Applied steps in the rolling window of the spike test (it starts once the window is full)."""

    def grad_accum_steps(self, dp: int) -> int:
        """global = micro × accum × dp; raises ConfigError naming the fields when it does not divide."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size} × data-parallel ranks={dp} "
                f"(= {per_step}); choose a global batch that is a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


class ParallelConfig(StrictModel):
    dp: int | None = Field(default=None, ge=1)
    """Data-parallel degree; None = the processes left over: world size / (tp × pp)."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel degree."""
    pp: int = Field(default=1, ge=1)
    """Pipeline-parallel degree."""
    pipeline_partition: Literal["parameters", "uniform", "compute"] = "parameters"
    """How pipeline stages are balanced (pp > 1): by parameter count (DeepSpeed's default), by layer
    count, or by forward FLOPs (`compute`: the embedding lookup weighs nothing and the LM head its
    2·V·d, so a large-vocabulary model's last stage gets fewer blocks)."""


class LaunchConfig(StrictModel):
    backend: Literal["local", "pytorchjob"] = "local"
    """local: torchrun/TorchX processes here; pytorchjob: a Kubeflow PyTorchJob on the cluster."""
    nproc_per_node: int = Field(default=1, ge=1)
    """Processes per node (GPUs per pod on a cluster)."""
    nnodes: int = Field(default=1, ge=1)
    """Nodes (pods). More than one needs backend=pytorchjob, or the local backend's
    scheduler=local_cwd (TorchX then runs each node as a local replica, rendezvousing on localhost)."""
    image: str | None = None
    """Container image of the workers on a cluster (None = the training image from the one image
    setting, KUBELLM_REGISTRY / KUBELLM_TAG: `kubellm.core.images.image_for`); the local backend runs
    this checkout."""
    scheduler: Literal["torchrun", "local_cwd"] = "torchrun"
    """Local backend: run the AppDef's torchrun command directly, or through TorchX's local_cwd."""
    cpu: int = Field(default=2, ge=1)
    """CPUs requested per replica (node/pod)."""
    gpu: int = Field(default=0, ge=0)
    """GPUs requested per replica."""
    memory_mb: int = Field(default=8192, ge=256)
    """Memory requested per replica, MiB."""
    max_restarts: int = Field(default=0, ge=0)
    """torchrun worker-group restarts before the job fails. On a PyTorchJob, 0 takes the cluster
    settings' `max_restarts` (default 3: pods there are preempted and rescheduled)."""
    env: dict[EnvKey, str] = Field(default_factory=dict)
    """Extra environment for every worker. No secrets: a key that names a credential (SECRET,
    PASSWORD, TOKEN, ACCESS_KEY, API_KEY, PRIVATE_KEY, CREDENTIAL; the PyTorchJob translator's rule,
    `kubellm.training.pytorchjob.translate.is_credential_env`) is refused — credentials come from a
    Kubernetes Secret or the launching environment."""
    cluster: ClusterLaunchSettings = Field(default_factory=ClusterLaunchSettings)
    """backend=pytorchjob: namespace, topology, resources, placement, S3 Secret reference, run policy
    (see `kubellm.training.pytorchjob.settings`)."""

    @model_validator(mode="after")
    def _nodes_need_a_multi_node_launcher(self) -> LaunchConfig:
        # the local torchrun scheduler starts one torchrun agent (node 0) on this machine: with
        # --nnodes > 1 it waits out the rendezvous timeout for nodes that never come
        if self.backend == "local" and self.scheduler == "torchrun" and self.nnodes > 1:
            raise ValueError(
                f"launch.nnodes={self.nnodes} with launch.backend=local and launch.scheduler=torchrun: one torchrun "
                "on this machine would wait for the other node(s) forever; multi-node runs need backend: "
                "pytorchjob (or, to try a multi-node layout on one machine, scheduler: local_cwd), or use "
                f"launch.nnodes: 1 with launch.nproc_per_node: {self.nnodes * self.nproc_per_node}")
        return self
