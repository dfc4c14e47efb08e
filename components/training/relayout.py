"""Resume a checkpoint in another TP/PP layout through kubellm's consolidated weights.

    relayout = consolidated_resume(run_dir, model_cfg, parallel_cfg)   # None: same layout (or none saved)
    if relayout is not None:
        init_state_dict = relayout.state_dict           # dense weights every layout shards from
        ...build model and DeepSpeed engine...
        client_state = relayout.apply(scheduler)          # step, data position; LR schedule fast-forwarded

The engine does this by itself on `train(..., resume=True)` when the newest committed checkpoint
(its manifest records `layout: {dp, tp, pp, zero_stage}`) was written with another `parallel.tp`
or `parallel.pp` than this run's: a TP=2 or PP=2 run resumes in 1 process and back, with the same
next-step loss (tested in `tests/parallel/test_parallel_relayout.py`).

What carries over: the model weights (every TP shard / pipeline-stage file of the checkpoint is
memory-mapped and un-sharded into the dense `Transformer` state dict one tensor at a time, as the new
layout's model is filled: no rank holds the dense model), the step, the data position and the
learning-rate schedule position (the applied steps: DeepSpeed holds it on a skipped step). What does not: **AdamW's moments restart from zero** (ZeRO's flat,
partitioned optimizer state is not resharded; DeepSpeed's `ds_to_universal` is the route for that),
so steps after the first resumed one differ slightly from an uninterrupted run. In DeepSpeed's
bf16/fp16 modes (CUDA) the weights carried over are the module files' bf16/fp16 copy, not the
optimizer's fp32 masters (those live in the same partitioned optimizer files), so a mixed-precision
run resumes in a new layout from weights rounded to 16 bits. The data-parallel
degree must stay the same (each rank's data position is per-DP-rank); ZeRO-3 checkpoints are refused
here (their module files hold no weights) — consolidate them with `CheckpointManager.consolidated_state_dict`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from kubellm.core.errors import ConfigError, IntegrityError
from kubellm.core.manifest import Manifest, fetch
from kubellm.core.storage import join
from kubellm.model.config import ModelConfig
from kubellm.model.parallel import unshard_tensor
from kubellm.training.config import ParallelConfig

_MP_FILE = re.compile(r"(?:^|/)mp_rank_(\d+)_model_states\.pt$")
_LAYER_FILE = re.compile(r"(?:^|/)layer_(\d+)-model_(\d+)-model_states\.pt$")
_STATE0 = re.compile(r"(?:^|/)kubellm_state_rank00000\.pt$")


class ConsolidatedWeights(Mapping[str, torch.Tensor]):
    """A TP/PP checkpoint's dense weights, un-sharded one tensor at a time, as fp32, when indexed. The
    shards are the checkpoint files' memory-mapped tensors, so their pages are read as a tensor is
    un-sharded and stay reclaimable page cache: a rank filling its model from this mapping
    (`kubellm.training.topology.fill_from_dense`) holds one dense tensor at a time, not the dense model."""

    def __init__(self, ranks: list[dict[str, torch.Tensor]], model_cfg: ModelConfig) -> None:
        self.ranks, self.cfg = ranks, model_cfg
        # a tied head is the embedding: no entry of its own (un-sharding the largest tensor twice)
        self.names = [n for n in ranks[0] if not (model_cfg.tie_embeddings and n == "output.weight")]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:  # without un-sharding (Mapping's default would)
        return name in self.names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return unshard_tensor(name, [r[name] for r in self.ranks], self.cfg).float().clone()


@dataclasses.dataclass
class Relayout:
    manifest: Manifest
    state_dict: Mapping[str, torch.Tensor]
    client_state: dict[str, Any]
    saved_layout: dict[str, int]

    def apply(self, scheduler: Any) -> dict[str, Any]:
        """Move the LR schedule to its saved position; return the client state (step, loader, …).

        DeepSpeed holds the schedule on a skipped step (non-finite, spike, fp16 overflow), so the
        position is the number of applied steps: `lr_steps` where the checkpoint records it, else
        the step minus the skips the guard counted."""
        for _ in range(scheduler_steps(self.client_state)):
            scheduler.step()
        return self.client_state


def scheduler_steps(client_state: dict[str, Any]) -> int:
    """How many times the LR schedule advanced before this checkpoint (applied optimizer steps)."""
    if "lr_steps" in client_state:
        return int(client_state["lr_steps"])
    skipped = (client_state.get("guard") or {}).get("skipped") or {}
    return int(client_state["step"]) - sum(int(v) for v in skipped.values())


def read_consolidated(manifest: Manifest, model_cfg: ModelConfig, staging: Path) -> tuple[ConsolidatedWeights,
                                                                                          dict[str, Any]]:
    """The dense weights (un-sharded as they are read, `ConsolidatedWeights`) and rank 0's client state of a
    committed checkpoint of any TP/PP layout. The files are memory-mapped: `staging` may be removed once
    this returns (the mappings keep them until the weights are dropped)."""
    from kubellm.training.checkpoint_engine import safe_torch_load
    from kubellm.training.pipeline import to_dense_name

    layout = manifest.metadata.get("layout") or {}
    if int(layout.get("zero_stage", 0)) == 3:
        raise ConfigError(f"{manifest.uri}: a ZeRO-3 checkpoint cannot change tp/pp here (its module files hold "
                          "no weights); resume it with the layout it was saved in")
    wanted = [f.path for f in manifest.files
              if _MP_FILE.search(f.path) or _LAYER_FILE.search(f.path) or _STATE0.search(f.path)]
    fetch(manifest, staging, paths=wanted)  # downloads and sha256-verifies each file before loading
    per_tp: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    client: dict[str, Any] | None = None
    for rel in wanted:
        path = staging / rel
        if m := _LAYER_FILE.search(rel):  # pipeline: one file per layer and TP rank
            layer, tp_rank = int(m.group(1)), int(m.group(2))
            for k, v in safe_torch_load(path, map_location="cpu", mmap=True).items():
                per_tp[tp_rank][to_dense_name(f"{layer}.{k}", model_cfg.n_layers)] = v
        elif m := _MP_FILE.search(rel):
            module = safe_torch_load(path, map_location="cpu", mmap=True).get("module")
            if module:  # None in a pipeline checkpoint (weights are in the layer files)
                per_tp[int(m.group(1))].update(module)
        else:
            state = safe_torch_load(path, map_location="cpu")
            if not isinstance(state, dict) or "client_state" not in state:
                raise IntegrityError(f"{manifest.uri}/{rel}: no client_state in it; the state file was not "
                                     "written by kubellm's CheckpointManager")
            client = dict(state["client_state"])
    if not per_tp or client is None:
        raise ConfigError(f"{manifest.uri}: no model-state files or no rank-0 kubellm state to consolidate")
    return ConsolidatedWeights([per_tp[r] for r in sorted(per_tp)], model_cfg), client


def consolidated_resume(run_dir: str, model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> Relayout | None:
    """The newest committed checkpoint under `run_dir`, consolidated, when it was saved with another
    tp/pp than `parallel_cfg` (resolved); None when there is none or the layout is the same."""
    from kubellm.training.checkpoint import CheckpointManager

    manifest = CheckpointManager(join(run_dir, "checkpoints")).latest()
    if manifest is None:
        return None
    saved = {k: int(v) for k, v in (manifest.metadata.get("layout") or {}).items()}
    if saved.get("tp", 1) == parallel_cfg.tp and saved.get("pp", 1) == parallel_cfg.pp:
        return None
    if saved.get("dp", 1) != parallel_cfg.dp:
        raise ConfigError(
            f"{manifest.uri} was saved with dp={saved.get('dp')}, tp={saved.get('tp')}, pp={saved.get('pp')}; "
            f"this run has dp={parallel_cfg.dp}, tp={parallel_cfg.tp}, pp={parallel_cfg.pp}. Changing tp/pp is "
            "supported when dp stays the same (the data position is per data-parallel rank); set parallel.dp="
            f"{saved.get('dp')} or start a fresh run from the consolidated export")
    from kubellm.training.checkpoint import CheckpointMismatchError
    from kubellm.training.engine_meta import model_config_diff

    differs = model_config_diff(manifest, model_cfg)
    if differs:  # the same check a same-layout resume makes (CheckpointManager.check_compatible)
        raise CheckpointMismatchError(f"{manifest.uri}: checkpoint is from a different model: {differs}. Use a new "
                                      "run prefix, or the matching model config.")
    # on the PyTorchJob's staging volume where there is one (checkpoint-sized; the pod's /tmp may not be)
    base = os.environ.get("KUBELLM_STAGING_DIR") or None
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="kubellm-relayout-", dir=base))
    try:
        full, client = read_consolidated(manifest, model_cfg, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Relayout(manifest=manifest, state_dict=full, client_state=client, saved_layout=saved)
