"""Tokenizer stage config."""

from __future__ import annotations

from pydantic import Field

from kubellm.core.config import StrictModel


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(default=2048, ge=260)
    """Target vocabulary size including special tokens (byte-level BPE needs ≥ 256 + specials)."""
    min_frequency: int = Field(default=2, ge=1)
    """Minimum pair frequency for a BPE merge."""
