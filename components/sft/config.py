"""SFT stage config."""

from __future__ import annotations

from kubellm.core.config import StrictModel
from kubellm.training.config import LaunchConfig, ParallelConfig, TrainConfig
from pydantic import Field


class SFTConfig(StrictModel):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=50))
    """Optimisation, batch, precision, ZeRO, checkpoints."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """dp × tp × pp layout."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Where and how many processes."""
