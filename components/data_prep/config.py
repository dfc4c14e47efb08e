"""Data-prep stage config."""

from __future__ import annotations

from kubellm.core.config import StrictModel
from pydantic import Field


class DataPrepConfig(StrictModel):
    text_field: str = "text"
    """Name of the text column in json/jsonl/parquet sources."""
    validation_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Fraction of documents (chosen by a hash of the text, deterministic) held out for validation."""
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    """Fail the stage when more than this fraction of records is unreadable."""
