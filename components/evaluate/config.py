"""Evaluate stage config."""

from __future__ import annotations

from pydantic import Field

from kubellm.core.config import StrictModel


class EvaluateConfig(StrictModel):
    tasks: list[str] = Field(default_factory=lambda: ["kubellm_knowledge", "kubellm_format",
                                                      "kubellm_preference"])
    """lm-eval task names: the bundled kubellm_* tasks and any standard harness task."""
    batch_size: int = Field(default=8, ge=1)
    """lm-eval batch size."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate at most this many items per task (None = all)."""
    seed: int = 1234
    """Seed for lm-eval's sampling and few-shot selection."""
