"""The stage registry: what each stage is called, what it reads, and where its `run()` lives.

Every stage is a plain function `run(config, inputs, output) -> Manifest` (no kfp import):
  config   the stage's typed section of the run-config
  inputs   input name -> reference to a committed artifact (its prefix URI, or a local manifest JSON
           file such as a KFP input artifact's path); raw sources are URIs/paths of files
  output   the storage root (local dir or s3://…) under which the stage publishes a
           content-addressed prefix; the returned Manifest says where.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from kubellm.core.errors import ConfigError
from kubellm.core.manifest import Manifest


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    """Run-config section and pipeline task name (snake_case)."""
    command: str
    """CLI subcommand (kebab-case)."""
    module: str
    """Module whose `run(config, inputs, output)` implements the stage."""
    inputs: tuple[str, ...]
    """Input names the stage requires."""
    optional_inputs: tuple[str, ...] = ()
    summary: str = ""


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("data_prep", "data-prep", "kubellm.data_prep.stage", ("raw",), (),
                  "clean, filter and deduplicate raw text into parquet shards"),
        StageSpec("tokenizer", "tokenizer", "kubellm.tokenizer.stage", ("dataset",), (),
                  "train byte-level BPE and encode the corpus into packed token shards"),
        StageSpec("pretrain", "pretrain", "kubellm.pretrain.stage", ("tokens",), ("resume",),
                  "pretrain the base model with DeepSpeed (ZeRO/TP/PP) and export it"),
        StageSpec("sft", "sft", "kubellm.sft.stage", ("model", "chat"), (),
                  "supervised fine-tuning on chat data with assistant-only loss"),
        StageSpec("dpo", "dpo", "kubellm.dpo.stage", ("model", "preferences"), (),
                  "align the SFT model with direct preference optimisation"),
        StageSpec("evaluate", "evaluate", "kubellm.evaluate.stage", ("models",), ("tokens", "baseline", "pointer"),
                  "lm-eval the exported models, write the report and apply the gate"),
    )
}


def run_stage(name: str, config: Any, inputs: Mapping[str, str], output: str) -> Manifest:
    spec = STAGES.get(name)
    if spec is None:
        raise ConfigError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    missing = [i for i in spec.inputs if i not in inputs]
    if missing:
        raise ConfigError(
            f"stage {spec.command}: missing input(s) {missing}; pass --input NAME=URI for each of "
            f"{list(spec.inputs)}"
        )
    unknown = set(inputs) - set(spec.inputs) - set(spec.optional_inputs)
    if unknown:
        raise ConfigError(
            f"stage {spec.command}: unknown input(s) {sorted(unknown)}; allowed: "
            f"{list(spec.inputs + spec.optional_inputs)}"
        )
    module = importlib.import_module(spec.module)
    return module.run(config, dict(inputs), output)
