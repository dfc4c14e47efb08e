"""SFT stage config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubellm.core.config import StrictModel
from kubellm.training.config import LaunchConfig, OptimConfig, ParallelConfig, TrainConfig


def _train() -> TrainConfig:
    return TrainConfig(max_steps=40, micro_batch_size=8, global_batch_size=16, seq_len=128,
                       optim=OptimConfig(lr=5e-4, warmup_steps=4, weight_decay=0.0))


class SFTConfig(StrictModel):
    on_bad_record: Literal["skip", "fail"] = "skip"
    """A conversation with no assistant turn, an assistant turn before any user turn, an unknown
    role, empty or non-text content, or longer than train.seq_len: skip it and count it in the
    report, or fail the stage naming file and line."""
    heldout_every: int = Field(default=10, ge=2)
    """Every N-th conversation is held out to measure assistant-token loss before and after SFT."""
    train: TrainConfig = Field(default_factory=_train)
    """Optimisation, batch, precision, ZeRO, checkpoints."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """dp × tp × pp layout."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Where and how many processes."""
