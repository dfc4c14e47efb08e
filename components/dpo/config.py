"""DPO stage config."""

from __future__ import annotations

from typing import Literal

from kubellm.core.config import StrictModel
from kubellm.training.config import LaunchConfig, ParallelConfig, TrainConfig
from pydantic import Field


class DPOConfig(StrictModel):
    beta: float = Field(default=0.1, gt=0)
    """DPO temperature on the log-ratio."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (with label_smoothing = conservative DPO); ipo: IPO."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """cDPO: probability that a preference label is flipped."""
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=30))
    """Optimisation, batch, precision, ZeRO, checkpoints."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """dp × tp × pp layout."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Where and how many processes."""
