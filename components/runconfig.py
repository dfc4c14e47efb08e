"""The run-config: one YAML file, one typed section per stage.

    kubellm <stage> --config run.yaml ...          # a file
    kubellm run --local --preset debug             # a shipped preset (components/configs/<name>.yaml)
    kubellm run --local --preset seed --set pretrain.train.max_steps=50

Each stage receives only its own section (`RunConfig.section(stage)`), so the KFP cache key of one
stage does not change when another stage's knobs do.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field

from kubellm.core.config import StrictModel, apply_overrides, deep_merge, parse_yaml, read_yaml, validate
from kubellm.core.errors import ConfigError
from kubellm.data_prep.config import DataPrepConfig
from kubellm.dpo.config import DPOConfig
from kubellm.evaluate.config import EvaluateConfig
from kubellm.pretrain.config import PretrainConfig
from kubellm.sft.config import SFTConfig
from kubellm.tokenizer.config import TokenizerConfig

PRESETS = ("debug", "seed")
STAGES = ("data_prep", "tokenizer", "pretrain", "sft", "dpo", "evaluate")


class StorageConfig(StrictModel):
    root: str = ".kubellm/artifacts"
    """Where stages publish their content-addressed outputs: a local directory or s3://bucket/prefix.
    S3 endpoint, region and credentials come from the environment, never from this file."""


class SourcesConfig(StrictModel):
    """Where the pipeline's input data lives: the defaults of its `raw_source`, `chat_source` and
    `preferences_source` parameters (a `--param` or a run argument still wins). Each is a local
    path/glob or an s3:// prefix or object; empty means "pass it when you run"."""

    raw: str = ""
    """Raw corpus (jsonl/json/parquet/text files or an s3:// prefix of them) for data prep."""
    chat: str = ""
    """SFT chat data (`messages` lists, jsonl)."""
    preferences: str = ""
    """DPO preference pairs (`prompt`, `chosen`, `rejected`, jsonl)."""


class RunConfig(StrictModel):
    """The whole pipeline's configuration."""

    name: str = "kubellm"
    """A name for runs made from this config (KFP run names, report titles)."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    """The input data: raw corpus, chat data, preference pairs (the pipeline's source parameters)."""
    data_prep: DataPrepConfig = Field(default_factory=DataPrepConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def section(self, stage: str) -> StrictModel:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
        return getattr(self, stage)


def preset_data(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    text = resources.files("kubellm").joinpath("configs", f"{name}.yaml").read_text()
    return parse_yaml(text, f"preset {name}")


def load_run_config(path: str | Path | None = None, *, preset: str | None = None,
                    overrides: list[str] | None = None) -> RunConfig:
    """Preset (optional) <- file (optional) <- `key.path=value` overrides, validated once."""
    data: dict[str, Any] = preset_data(preset) if preset else {}
    source = f"preset {preset}" if preset else "<defaults>"
    if path is not None:
        data = deep_merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(RunConfig, data, source)


def load_section(stage: str, data: dict[str, Any], source: str) -> StrictModel:
    """Validate one stage's section on its own (what a KFP component receives)."""
    field = RunConfig.model_fields[stage]
    assert field.annotation is not None
    return validate(field.annotation, data, source, prefix=stage)
