"""Pretrain stage config."""

from __future__ import annotations

from pydantic import Field

from kubellm.core.config import StrictModel
from kubellm.model.config import ModelSpec
from kubellm.training.config import LaunchConfig, ParallelConfig, TrainConfig


class PretrainConfig(StrictModel):
    model: ModelSpec = Field(default_factory=ModelSpec)
    """Which model to build (preset + overrides)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation, batch, precision, ZeRO, checkpoints."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """dp × tp × pp layout."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Where and how many processes."""
