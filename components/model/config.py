"""Model shapes and the preset registry.

    from kubellm.model.config import get_preset
    cfg = get_preset("debug").with_(vocab_size=2048)
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from kubellm.core.config import StrictModel
from kubellm.core.errors import ConfigError


class ModelConfig(StrictModel):
    """A Llama-style decoder's shape."""

    vocab_size: int = Field(default=10000, ge=2)
    """Vocabulary size; the tokenizer's vocab must not exceed it."""
    dim: int = Field(default=128, ge=8)
    """Model (residual stream) width."""
    n_layers: int = Field(default=6, ge=1)
    """Number of transformer blocks."""
    n_heads: int = Field(default=8, ge=1)
    """Attention (query) heads; must divide `dim`."""
    n_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads for grouped-query attention; must divide `n_heads`. None = `n_heads` (MHA)."""
    ffn_dim: int = Field(default=256, ge=1)
    """Hidden width of the SwiGLU feed-forward."""
    max_seq_len: int = Field(default=256, ge=8)
    """Longest sequence (context length) the model trains and runs on."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """RoPE base frequency."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding and output projection weights."""
    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the normal initialisation of linear and embedding weights."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"n_kv_heads={kv} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim/n_heads) must be even for RoPE")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def with_(self, **changes: Any) -> ModelConfig:
        return ModelConfig.model_validate({**self.model_dump(), **changes})


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-fast: trains in minutes on 2 cores; used by tests and the demo.
    "debug": dict(vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=128),
    # The seed document's model.
    "seed": dict(vocab_size=10000, dim=128, n_layers=6, n_heads=8, ffn_dim=256, max_seq_len=256),
    "125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=2048,
                 tie_embeddings=True),
    "350m": dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, ffn_dim=2816, max_seq_len=2048),
    "1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
               max_seq_len=2048),
    "7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4096),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: expected one of {', '.join(PRESETS)}")
    return ModelConfig.model_validate(PRESETS[name])


class ModelSpec(StrictModel):
    """Which model to build: a preset plus field overrides."""

    preset: str = "debug"
    """One of: debug, seed, 125m, 350m, 1b, 7b."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """ModelConfig fields that replace the preset's (e.g. {max_seq_len: 512})."""

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        unknown = set(self.overrides) - set(ModelConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}; allowed: "
                             f"{', '.join(ModelConfig.model_fields)}")
        self.build()
        return self

    def build(self) -> ModelConfig:
        return ModelConfig.model_validate({**PRESETS[self.preset], **self.overrides})
