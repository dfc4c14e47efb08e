"""The DeepSpeed config, generated from the run-config in one function.

    ds = deepspeed_config(train_cfg, parallel_cfg, world_size=2, device="cpu")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)

Choices and why:
* Optimizer: DeepSpeed's `AdamW` with `torch_adam: true` (torch.optim.AdamW, `fused=True`) — DeepSpeed's FusedAdam
  on CPU is a different kernel whose rounding differs from torch's, which would blur the ZeRO
  parity tests. With optimizer offload DeepSpeed requires its own `DeepSpeedCPUAdam` (adamw mode).
* bf16: DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in the optimizer) on CUDA; on CPU the
  engine uses `torch.autocast(bfloat16)` over fp32 weights instead (DeepSpeed's bf16 optimizer paths
  target accelerators). fp16 (loss scaling) is CUDA-only and refused on CPU.
* ZeRO buffers are sized from the model (`zero_buffer_sizes`), not left at DeepSpeed's defaults: the
  gradient reduce bucket is one persistent (ZeRO-3) or per-step (ZeRO-1/2) buffer of
  `reduce_bucket_size` elements, 5e8 by default — 1 GiB of bf16 per GPU whatever the model's size
  (10× a 50M-parameter model's weights). kubellm uses dim² elements (a weight matrix's worth, as
  Hugging Face's DeepSpeed integration does), at least 2^20 and at most the model's parameters, and
  ZeRO-3 keeps whole only parameters below 10·dim elements (the norms), so a small preset partitions
  as a large one does. `kubellm plan` counts the bucket (`planner.model_state_bytes`).
* The learning-rate schedule is not in here: it is `kubellm.training.optim.lr_lambda`, passed to
  `deepspeed.initialize(lr_scheduler=...)` so DeepSpeed steps and checkpoints it.
"""

from __future__ import annotations

from typing import Any

from kubellm.core.errors import ConfigError
from kubellm.model.config import ModelConfig
from kubellm.training.config import ParallelConfig, TrainConfig

BUCKET_MIN = 1 << 20
"""The smallest gradient reduce bucket (elements): below it a step's reductions split into many
small collectives for no memory worth saving."""


def zero_buffer_sizes(model_cfg: ModelConfig) -> dict[str, int]:
    """DeepSpeed ZeRO buffer settings for this model: the gradient reduce bucket (dim², within
    [2^20, parameters]) and ZeRO-3's persistence threshold (10·dim: parameters below it are not
    partitioned)."""
    from kubellm.model.flops import num_params

    bucket = min(max(model_cfg.dim**2, BUCKET_MIN), num_params(model_cfg))
    return {"reduce_bucket_size": int(bucket), "stage3_param_persistence_threshold": 10 * model_cfg.dim}


def data_parallel_size(parallel_cfg: ParallelConfig, world_size: int) -> int:
    """Check the dp × tp × pp layout against the processes that exist and return dp."""
    # tp/pp themselves are checked against the model in kubellm.training.topology.validate_layout
    mp = parallel_cfg.tp * parallel_cfg.pp
    if parallel_cfg.dp is None:
        if world_size % mp:
            raise ConfigError(f"parallel.tp={parallel_cfg.tp} × pp={parallel_cfg.pp} = {mp} does not divide the "
                              f"job's {world_size} process(es) (launch.nproc_per_node × launch.nnodes)")
        return world_size // mp
    if parallel_cfg.dp * mp != world_size:
        raise ConfigError(
            f"parallel.dp={parallel_cfg.dp} × tp={parallel_cfg.tp} × pp={parallel_cfg.pp} = "
            f"{parallel_cfg.dp * mp} but the job has {world_size} "
            f"process(es) (launch.nproc_per_node × launch.nnodes); make them equal or leave dp unset"
        )
    return parallel_cfg.dp


def deepspeed_half(train_cfg: TrainConfig, device: str) -> str | None:
    """DeepSpeed's 16-bit mode the engine runs in — "bf16" (bf16 on CUDA) or "fp16" — or None: fp32
    weights (fp32, or bf16 as autocast on CPU). The one place that decides it."""
    if train_cfg.precision == "fp16":
        return "fp16"
    return "bf16" if train_cfg.precision == "bf16" and device == "cuda" else None


def clips_in_kubellm(train_cfg: TrainConfig, parallel_cfg: ParallelConfig, device: str = "cpu") -> bool:
    """True where the training loop clips gradients itself instead of DeepSpeed: ZeRO 0 with the
    module's .grad the fp32 gradients the optimizer uses (no DeepSpeed 16-bit mode), in every layout.
    Dense, DeepSpeed's clip recomputes the norm per parameter in Python (~1 ms of a `debug` step);
    under pipeline parallelism its norm covers the first stage's parameters only (DeepSpeed counts a
    parameter where the grid's model-parallel rank, pipe stage and TP slice together, is 0), so later
    stages were clipped by a norm missing their own gradients. kubellm clips by the one global norm
    it also logs and checks (`gradients.clip_gradients`, `gradients.model_parallel_grad_norm`)."""
    return train_cfg.zero_stage == 0 and deepspeed_half(train_cfg, device) is None


def deepspeed_config(train_cfg: TrainConfig, parallel_cfg: ParallelConfig, world_size: int,
                     device: str = "cpu", model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The config `deepspeed.initialize` gets. `model_cfg` sizes the ZeRO buffers (`zero_buffer_sizes`;
    the engine always passes it; without it DeepSpeed's defaults apply)."""
    dp = data_parallel_size(parallel_cfg, world_size)
    accum = train_cfg.grad_accum_steps(dp)
    if train_cfg.offload_params and train_cfg.zero_stage != 3:
        raise ConfigError(f"train.offload_params needs train.zero_stage=3 (got {train_cfg.zero_stage})")
    if train_cfg.offload_optimizer and train_cfg.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage ≥ 1 (got 0)")
    if train_cfg.compile and (parallel_cfg.tp > 1 or parallel_cfg.pp > 1):
        raise ConfigError(f"train.compile is supported for dense models only; got parallel.tp={parallel_cfg.tp}, "
                          f"parallel.pp={parallel_cfg.pp} (set train.compile: false or tp = pp = 1)")
    if train_cfg.precision == "fp16" and device != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA; on CPU use fp32 or bf16")
    o = train_cfg.optim
    opt_params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                  "weight_decay": o.weight_decay}
    if not train_cfg.offload_optimizer:
        opt_params["torch_adam"] = True
        # torch's fused AdamW kernel (CPU and CUDA): same update, one pass over each tensor instead of
        # ~10 small ops per parameter; 5× faster optimizer step on the seed preset (BENCHMARKS.md)
        opt_params["fused"] = True
    zero: dict[str, Any] = {"stage": train_cfg.zero_stage}
    if train_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if train_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if model_cfg is not None and train_cfg.zero_stage >= 1:
        sizes = zero_buffer_sizes(model_cfg)
        zero["reduce_bucket_size"] = sizes["reduce_bucket_size"]
        if train_cfg.zero_stage == 3:
            zero["stage3_param_persistence_threshold"] = sizes["stage3_param_persistence_threshold"]
    if train_cfg.zero_stage == 3:
        # the final export gathers full weights from the shards
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_batch_size": train_cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "optimizer": {"type": "AdamW", "params": opt_params},
        # ZeRO-0 fp32/CPU-autocast runs clip in kubellm by the one global norm that is also logged and
        # checked (any tp/pp); everywhere else DeepSpeed clips (ZeRO partitions, 16-bit loss scaling)
        "gradient_clipping": 0.0 if clips_in_kubellm(train_cfg, parallel_cfg, device) else o.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # kubellm logs metrics itself
        "wall_clock_breakdown": False,
        "seed": train_cfg.seed,
    }
    half = deepspeed_half(train_cfg, device)
    if half == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif half == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if parallel_cfg.pp > 1:
        # kubellm passes (x, position_ids, doc_ids) between stages; DeepSpeed's slice-partitioned
        # activation transfer assumes one float tensor, so send them whole
        cfg["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if train_cfg.offload_optimizer and train_cfg.zero_stage >= 1:
        # DeepSpeedCPUAdam is the only optimizer DeepSpeed accepts with offload
        cfg["zero_force_ds_cpu_optimizer"] = True
    return cfg
