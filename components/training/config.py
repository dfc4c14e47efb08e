"""Configs of the shared training engine (pretrain, SFT and DPO all use these)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubellm.core.config import StrictModel


class OptimConfig(StrictModel):
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine decay floor as a fraction of `lr`."""
    warmup_steps: int = Field(default=10, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay (AdamW); not applied to norms, biases or embeddings."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this (0 = off)."""


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


class ParallelConfig(StrictModel):
    dp: int = Field(default=1, ge=1)
    """Data-parallel degree."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel degree."""
    pp: int = Field(default=1, ge=1)
    """Pipeline-parallel degree."""


class LaunchConfig(StrictModel):
    backend: Literal["local", "pytorchjob"] = "local"
    """local: torchrun/TorchX processes here; pytorchjob: a Kubeflow PyTorchJob on the cluster."""
    nproc_per_node: int = Field(default=1, ge=1)
    """Processes per node (GPUs per pod on a cluster)."""
    nnodes: int = Field(default=1, ge=1)
    """Nodes (pods)."""
