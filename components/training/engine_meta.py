"""What a checkpoint records of the engine that wrote it, and compares on resume: the parallel layout
(world size, dp/tp/pp, ZeRO stage), the model config, every parameter's full shape and the precision.
`kubellm.training.checkpoint` writes them into each manifest's metadata; `kubellm.training.relayout`
reads them to resume under another tp/pp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from kubellm.core.manifest import Manifest


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclasses.dataclass(frozen=True)
class Layout:
    """The parallel layout a checkpoint's shards depend on."""

    world_size: int
    dp: int
    tp: int
    pp: int
    zero_stage: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def model_config_diff(manifest: Manifest, model_config: Any) -> str:
    """'' when the checkpoint's recorded model config (if any) equals `model_config`, else what differs."""
    want_cfg, have_cfg = config_dict(model_config), manifest.metadata.get("model_config")
    if want_cfg is None or have_cfg is None:
        return ""
    diff = [f"{k}: checkpoint={have_cfg.get(k)!r}, this run={want_cfg.get(k)!r}"
            for k in sorted(set(want_cfg) | set(have_cfg)) if have_cfg.get(k) != want_cfg.get(k)]
    return "model config differs — " + "; ".join(diff) if diff else ""


def engine_layout(engine: Any) -> Layout:
    """World size, DP/TP/PP degrees and ZeRO stage of a DeepSpeed engine."""
    return Layout(
        world_size=dist.get_world_size() if _initialized() else 1,
        dp=int(getattr(engine, "dp_world_size", 1) or 1),
        # the grid's TP size: DeepSpeed's mp_world_size is TP × PP under a PipelineModule
        tp=int(engine.mpu.get_tensor_model_parallel_world_size() if getattr(engine, "mpu", None) is not None
               else getattr(engine, "mp_world_size", 1) or 1),
        pp=int(getattr(engine, "num_stages", 1) or 1),  # PipelineEngine only
        zero_stage=int(engine.zero_optimization_stage()),
    )


def zero_partition_rank(engine: Any) -> int:
    """This rank's index within the ZeRO partition group (the `r` in `zero_pp_rank_{r}`)."""
    if not _initialized():
        return 0
    group = getattr(getattr(engine, "optimizer", None), "dp_process_group", None)
    if group is not None:
        return int(dist.get_rank(group=group))
    return int(dist.get_rank(group=getattr(engine, "data_parallel_group", None)))


def config_dict(cfg: Any) -> dict[str, Any] | None:
    if cfg is None:
        return None
    if hasattr(cfg, "model_dump"):
        return dict(cfg.model_dump(mode="json"))
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"model_config must be a pydantic model, dataclass or mapping, got {type(cfg).__name__}")


def module_config(engine: Any) -> Any:
    module = getattr(engine, "module", None)
    for attr in ("cfg", "config", "model_config"):
        cfg = getattr(module, attr, None)
        if cfg is not None and (hasattr(cfg, "model_dump") or dataclasses.is_dataclass(cfg)):
            return cfg
    return None


def param_shapes(engine: Any) -> dict[str, list[int]]:
    """Full (unpartitioned) shape of every parameter: ZeRO-3 keeps the real one in `ds_shape`."""
    out = {}
    for name, p in engine.module.named_parameters():
        shape = getattr(p, "ds_shape", None) or p.shape
        out[name] = [int(s) for s in shape]
    return out


def precision_name(engine: Any) -> str:
    if engine.bfloat16_enabled():
        return "bf16"
    return "fp16" if engine.fp16_enabled() else "fp32"
