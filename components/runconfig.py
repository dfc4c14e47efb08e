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
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kubellm.core.config import StrictModel, apply_overrides, merge_config, parse_yaml, read_yaml, validate
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


_CPU = r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$"
_MEMORY = r"^[0-9]+(\.[0-9]+)?(E|P|T|G|M|k|Ei|Pi|Ti|Gi|Mi|Ki)?$"


class Toleration(StrictModel):
    """A Kubernetes toleration of a step's pod (e.g. the taint on GPU nodes)."""

    key: str = ""
    """The taint's key (empty with operator Exists: tolerate every taint)."""
    operator: Literal["Equal", "Exists"] = "Equal"
    """Equal: the taint's value must match `value`; Exists: any value."""
    value: str = ""
    """The taint's value (operator Equal)."""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    """The taint effect tolerated (empty: all)."""


class StepResources(StrictModel):
    """The pod of one kind of pipeline step on Kubeflow: Kubernetes quantities as strings, empty
    for the cluster's defaults."""

    cpu_request: str = Field(default="", pattern=_CPU + "|^$")
    """e.g. "2" or "500m"."""
    cpu_limit: str = Field(default="", pattern=_CPU + "|^$")
    """CPU limit, same form."""
    memory_request: str = Field(default="", pattern=_MEMORY + "|^$")
    """e.g. "8Gi"."""
    memory_limit: str = Field(default="", pattern=_MEMORY + "|^$")
    """Memory limit, same form."""
    accelerator_type: str = ""
    """The extended resource of the accelerator, e.g. "nvidia.com/gpu" (needs accelerator_limit)."""
    accelerator_limit: int = Field(default=0, ge=0, le=64)
    """How many of `accelerator_type` the pod gets (0: none)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pod must land on, e.g. {node.kubernetes.io/instance-type: g5.xlarge}."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pod tolerates (e.g. the one on GPU nodes)."""

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", mode="before")
    @classmethod
    def _number_as_quantity(cls, v: Any) -> Any:
        """`--set pipeline.evaluate.cpu_request=4` parses as a number: a quantity all the same."""
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _accelerator_pair(self) -> StepResources:
        if bool(self.accelerator_type) != bool(self.accelerator_limit):
            raise ValueError("accelerator_type and accelerator_limit go together (e.g. nvidia.com/gpu and 1)")
        return self


class PipelineConfig(StrictModel):
    """How the steps run on Kubeflow: each kind of step's pod resources, node selector and tolerations.
    Compile-time: not pipeline parameters, so not in any step's cache key. Training runs in its own
    PyTorchJob (`<stage>.launch`), so a training step's pod here is only the launcher's — unless
    `launch.backend: local` trains inside it. `kubellm run --local` ignores this section."""

    data_prep: StepResources = Field(default_factory=StepResources)
    """data prep (and, fanned out, list-shards / prepare-shard / dedup-reduce)."""
    tokenizer: StepResources = Field(default_factory=StepResources)
    """tokenizer training and shard encoding."""
    pretrain: StepResources = Field(default_factory=StepResources)
    """the pretrain step (the PyTorchJob launcher, or training itself with launch.backend: local)."""
    sft: StepResources = Field(default_factory=StepResources)
    """the SFT step (as pretrain)."""
    dpo: StepResources = Field(default_factory=StepResources)
    """the DPO step (as pretrain)."""
    evaluate: StepResources = Field(default_factory=StepResources)
    """lm-eval runs in this pod: give it a GPU here to evaluate on one."""
    base: StepResources = Field(default_factory=StepResources)
    """the small steps: fingerprints and model resolution."""


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
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    """Pod resources, node selectors and tolerations of the Kubeflow steps (compile-time)."""

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
        data = merge_config(RunConfig, data, read_yaml(path))  # as --param <stage>_config merges
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + ", ".join(o.split("=", 1)[0].strip() for o in overrides)  # keys: values may be secret
    return validate(RunConfig, data, source)


def load_section(stage: str, data: dict[str, Any], source: str) -> StrictModel:
    """Validate one stage's section on its own (what a KFP component receives)."""
    field = RunConfig.model_fields[stage]
    assert field.annotation is not None
    return validate(field.annotation, data, source, prefix=stage)
