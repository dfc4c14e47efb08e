"""Pretrain stage config."""

from __future__ import annotations

from pydantic import Field

from kubellm.core.config import StrictModel
from kubellm.model.config import ModelSpec
from kubellm.training.config import LaunchConfig, ParallelConfig, TrainConfig


class PretrainDataConfig(StrictModel):
    split: str = "train"
    """Which shard folder of the tokens artifact to train on (`<split>/*.tok`)."""
    doc_masking: bool = False
    """Pass per-token document ids and restarted positions so attention never crosses the documents
    packed into one window (off for pretraining: cross-document context is the usual practice)."""
    shuffle: bool = True
    """Shuffle windows each epoch (seeded by train.seed and the epoch)."""
    cache_dir: str | None = None
    """Node-local directory for shards fetched from S3 (default: $KUBELLM_CACHE_DIR or
    ~/.cache/kubellm/shards)."""


class PretrainConfig(StrictModel):
    model: ModelSpec = Field(default_factory=ModelSpec)
    """Which model to build (preset + overrides)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation, batch, precision, ZeRO, checkpoints."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """dp × tp × pp layout."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Where and how many processes."""
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    """Which token shards and how they are windowed."""
