"""The dp × tp × pp layout: validation, process groups (DeepSpeed's grid as the `mpu`), model building.

    from kubellm.training.topology import validate_layout, build_parallel_model
    validate_layout(model_cfg, train_cfg, parallel_cfg, world_size)       # ConfigError with the numbers
    built = build_parallel_model(model_cfg, train_cfg, parallel_cfg, init_state_dict)
    engine, *_ = deepspeed.initialize(model=built.module, mpu=built.mpu, ...)   # mpu None with PP
    loader = objective.build_loader(built.dp_rank, built.dp_size, micro, seed)   # same data per TP/PP group
    full = built.consolidate(engine)                                  # collective; dense weights on rank 0

The engine calls these when `parallel.tp > 1` or `parallel.pp > 1` (`kubellm.training.engine.train`).

Rank order is DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model; model fastest):
with tp=2 × dp=2 ranks {0,1} and {2,3} are the TP groups, {0,2} and {1,3} the DP groups. Without
PP, a `PipelineParallelGrid` over that topology is the `mpu` handed to `deepspeed.initialize`: it has
every method DeepSpeed 0.19.8 calls (get_{data,model,tensor_model,pipe}_parallel_{rank,world_size,
group}, get_data_parallel_group_ranks); its "model" group is the TP group when pp=1, so DeepSpeed's
gradient-norm reduction and checkpoint `mp_rank` follow TP. With PP the `PipelineModule` builds the
same grid itself (DeepSpeed refuses an mpu next to a PipelineModule) — see
`kubellm.training.pipeline`.

Initialisation: every rank draws the dense model's initial weights from the same seed one tensor at a
time (`kubellm.model.transformer.dense_init_tensors`, the draws `Transformer(cfg)` makes) and keeps
its TP shard / pipeline stage of each (`fill_from_dense`), so any layout starts from exactly the weights
one process would draw on the same kind of device, while a rank holds its own shards plus one dense
tensor at a time (usually the embedding is the largest), never the dense model: eight ranks of a 7B model on one node would otherwise need
8 × 27 GB of host memory at start-up. An `init_state_dict` is sliced the same way, tensor by tensor:
SFT/DPO's base model arrives as `kubellm.model.hf.HFWeights`, which reads each tensor from the
safetensors only when it is asked for, and a tp/pp relayout's checkpoint as
`kubellm.training.relayout.ConsolidatedWeights`, which un-shards one tensor of its memory-mapped files per lookup."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kubellm.core.errors import ConfigError
from kubellm.model.config import ModelConfig
from kubellm.training.config import ParallelConfig, TrainConfig


def validate_layout(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                    world_size: int) -> ParallelConfig:
    """Refuse a layout that cannot run, at start-up, naming the numbers and a layout that works.
    Returns the layout with `dp` resolved (None = world / (tp × pp))."""
    tp, pp = parallel_cfg.tp, parallel_cfg.pp
    if world_size % (tp * pp):
        raise ConfigError(_world_not_divisible(model_cfg, train_cfg, parallel_cfg, world_size))
    if parallel_cfg.dp is None:
        parallel_cfg = parallel_cfg.model_copy(update={"dp": world_size // (tp * pp)})
    dp = parallel_cfg.dp
    assert dp is not None
    if dp * tp * pp != world_size:
        raise ConfigError(
            f"parallel.dp={dp} × tp={tp} × pp={pp} = {dp * tp * pp} but the job has {world_size} process(es) "
            f"(launch.nproc_per_node × launch.nnodes); make them equal: parallel.dp={world_size // (tp * pp)}, "
            "or leave parallel.dp unset (it is then the processes left over, world size / (tp × pp))")
    if tp > 1:
        bad = [f"{what}={n}" for what, n in [("n_heads", model_cfg.n_heads), ("n_kv_heads", model_cfg.kv_heads),
                                             ("ffn_dim", model_cfg.ffn_dim), ("vocab_size", model_cfg.vocab_size)]
               if n % tp]
        if bad:
            raise ConfigError(
                f"parallel.tp={tp} does not divide the model's {', '.join(bad)}: tensor parallelism splits "
                "attention heads, KV heads, FFN columns and vocabulary rows evenly; choose a tp that divides "
                f"all of them (n_heads={model_cfg.n_heads}, n_kv_heads={model_cfg.kv_heads}, "
                f"ffn_dim={model_cfg.ffn_dim}, vocab_size={model_cfg.vocab_size})")
    if pp > 1:
        if pp > model_cfg.n_layers:
            raise ConfigError(f"parallel.pp={pp} is larger than the model's n_layers={model_cfg.n_layers}: every "
                              f"pipeline stage needs at least one transformer block; use parallel.pp ≤ "
                              f"{model_cfg.n_layers}")
        if train_cfg.zero_stage > 1:
            raise ConfigError(
                f"train.zero_stage={train_cfg.zero_stage} with parallel.pp={pp}: DeepSpeed's pipeline engine "
                "supports ZeRO stage 0 or 1 only (stages 2/3 partition gradients/parameters, which the "
                f"pipeline schedule does not); use train.zero_stage=1 with parallel.pp={pp}, or "
                f"parallel.pp=1 with ZeRO-{train_cfg.zero_stage} (tp and dp as you like)")
        if train_cfg.offload_optimizer:
            raise ConfigError("train.offload_optimizer with parallel.pp > 1 is not supported by this engine; "
                              "use parallel.pp=1 for ZeRO offload")
    # global = micro × accum × dp: a micro-batch count per step that does not divide is refused here
    train_cfg.grad_accum_steps(dp)
    return parallel_cfg


def _world_not_divisible(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                         world_size: int) -> str:
    """The refusal for a world size that tp × pp does not divide: no parallel.dp fits. It names what
    would work, each checked by `validate_layout` itself (tp divides the model, pp ≤ layers, ZeRO with
    pp, the global batch over dp): the nearest process counts below and above that are multiples of
    tp × pp, and the tp (pp kept) or pp (tp kept) values that divide this world size."""
    tp, pp, n, dp = parallel_cfg.tp, parallel_cfg.pp, world_size, parallel_cfg.dp
    mp = tp * pp

    def runs(layout: ParallelConfig, world: int) -> bool:
        try:
            validate_layout(model_cfg, train_cfg, layout, world)
        except ConfigError:
            return False
        return True

    unset = parallel_cfg.model_copy(update={"dp": None})
    below = next((k * mp for k in range(n // mp, 0, -1) if runs(unset, k * mp)), None)
    above = next((k * mp for k in range(n // mp + 1, n // mp + 65) if runs(unset, k * mp)), None)
    worlds = " or ".join(str(w) for w in (below, above) if w is not None)
    fixes = []
    if dp is not None and runs(parallel_cfg, dp * mp):
        fixes.append(f"launch {dp * mp} processes (parallel.dp={dp} × tp × pp)")
    if worlds:
        fixes.append(f"{'leave parallel.dp unset and ' if dp is not None else ''}launch a multiple of {mp} "
                     f"processes ({worlds})")
    regrid = []
    if n % pp == 0:
        tps = [t for t in range(1, n // pp + 1) if (n // pp) % t == 0 and runs(ParallelConfig(tp=t, pp=pp), n)]
        if tps:
            regrid.append(f"parallel.tp in {{{', '.join(map(str, tps))}}} with pp={pp}")
    if n % tp == 0:
        pps = [q for q in range(1, min(n // tp, model_cfg.n_layers) + 1)
               if (n // tp) % q == 0 and runs(ParallelConfig(tp=tp, pp=q), n)]
        if pps:
            regrid.append(f"parallel.pp in {{{', '.join(map(str, pps))}}} with tp={tp}")
    if regrid:
        fixes.append(f"{' or '.join(regrid)}, for {n} processes ("
                     + ("leave parallel.dp unset: it is then" if dp is not None else "parallel.dp, unset, is then")
                     + " world size / (tp × pp))")
    msg = (f"{n} process(es) (launch.nproc_per_node × launch.nnodes) is not a multiple of tp × pp = {mp} "
           f"(parallel.tp={tp} × pp={pp}), so no parallel.dp fits")
    return f"{msg}; {'; or '.join(fixes)}" if fixes else msg


@dataclasses.dataclass
class ParallelModel:
    """A model laid out over the grid, and what the engine needs to drive it."""

    module: nn.Module
    """A `Transformer` with TP layers (pp=1) or a DeepSpeed `PipelineModule` (pp>1)."""
    mpu: Any
    """The process-group provider for `deepspeed.initialize(mpu=...)`; None for a PipelineModule."""
    dp_rank: int
    dp_size: int
    tp_rank: int
    stage: int
    pipeline: bool
    consolidate: Callable[[Any, Collection[str] | None], dict[str, torch.Tensor] | None]
    """Collective: given the DeepSpeed engine, the dense `Transformer` state dict on rank 0 (None
    elsewhere), or its entries among the dense names given (every rank must give the same)."""

    @property
    def feeds_data(self) -> bool:
        """Whether this rank's micro-batches count as distinct tokens (TP rank 0 of the first stage)."""
        return self.tp_rank == 0 and self.stage == 0


def make_grid(parallel_cfg: ParallelConfig) -> Any:
    """DeepSpeed's grid over (pipe, data, model); its groups are created collectively on all ranks."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    if parallel_cfg.dp is None:
        raise ValueError("make_grid needs a resolved layout (validate_layout fills in dp)")
    topo = PipeModelDataParallelTopology(num_pp=parallel_cfg.pp, num_mp=parallel_cfg.tp, num_dp=parallel_cfg.dp)
    return PipelineParallelGrid(topology=topo)


def fill_from_dense(module: nn.Module, model_cfg: ModelConfig, tp_rank: int, tp_size: int,
                    init_state_dict: Mapping[str, torch.Tensor] | None, device: torch.device | str = "cpu",
                    dense_name: Callable[[str], str] = lambda k: k) -> None:
    """Copy into every entry of `module.state_dict()` (a TP shard of the model, or a pipeline stage
    whose names `dense_name` maps to the dense model's) its TP shard of the dense weights:
    `init_state_dict`'s, or, when None, `dense_init_tensors`' draws from the RNG (the caller seeded
    it identically on every rank), one dense tensor alive at a time. Every entry must be filled."""
    from kubellm.model.parallel import shard_tensor
    from kubellm.model.transformer import dense_init_tensors, init_order

    dense_names = {name for name, _ in init_order(model_cfg)}
    local = module.state_dict()
    wanted: dict[str, list[str]] = {}
    for key in local:
        name = dense_name(key)
        if model_cfg.tie_embeddings and name == "output.weight":
            name = "tok_embeddings.weight"  # the tied head is the embedding
        wanted.setdefault(name, []).append(key)
    unknown = sorted(set(wanted) - dense_names)
    if unknown:
        raise ValueError(f"{type(module).__name__} has entries the dense model does not: {unknown[:5]}")
    source: Iterator[tuple[str, torch.Tensor]]
    if init_state_dict is None:
        source = dense_init_tensors(model_cfg, device)  # every draw, in order: the RNG stream is the model
    else:
        extra = [n for n in init_state_dict
                 if n not in dense_names and not (n == "output.weight" and model_cfg.tie_embeddings)]
        if extra:
            raise KeyError(f"the initial weights hold {extra[0]!r}, which the model does not have")
        lacking = sorted(n for n in wanted if n not in init_state_dict)
        if lacking:
            raise KeyError(f"the initial weights lack {lacking[:5]} (of {len(dense_names)} the model has)")
        # only what this module holds is looked up: a lazy mapping (a safetensors directory, a checkpoint's
        # shards) then reads just a pipeline stage's own layers
        source = ((name, init_state_dict[name]) for name, _ in init_order(model_cfg) if name in wanted)
    with torch.no_grad():
        for name, full in source:
            for key in wanted.pop(name, []):
                shard = shard_tensor(name, full, model_cfg, tp_rank, tp_size)
                if shard.shape != local[key].shape:
                    raise ValueError(f"initial weight {name!r} has shape {tuple(full.shape)}; this model "
                                     f"(tp rank {tp_rank} of {tp_size}) needs {tuple(local[key].shape)} from it")
                local[key].copy_(shard)
                del shard
            del full  # before the next dense tensor is drawn
    if wanted:
        raise KeyError(f"the initial weights lack {sorted(wanted)[:5]} (of {len(dense_names)} the model has)")


def build_parallel_model(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                         init_state_dict: Mapping[str, torch.Tensor] | None = None,
                         device: str = "cpu") -> ParallelModel:
    """Build the model for this rank of the dp × tp × pp layout (collective: creates the groups).
    `parallel_cfg` must be resolved by `validate_layout`."""
    if parallel_cfg.pp > 1:
        from kubellm.training.pipeline import build_pipeline

        return build_pipeline(model_cfg, train_cfg, parallel_cfg, init_state_dict, device=device)
    return build_tensor_parallel(model_cfg, train_cfg, parallel_cfg, init_state_dict, device)


def build_tensor_parallel(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                          init_state_dict: Mapping[str, torch.Tensor] | None = None,
                          device: str = "cpu") -> ParallelModel:
    from kubellm.model import Transformer
    from kubellm.model.parallel import (
        TensorParallelGroup,
        TensorParallelLayers,
        gather_state_dict,
    )

    grid = make_grid(parallel_cfg)
    tp = TensorParallelGroup(rank=grid.get_slice_parallel_rank(), size=parallel_cfg.tp,
                             group=grid.get_slice_parallel_group())
    model = Transformer(model_cfg, layers=TensorParallelLayers(tp), device=device, init=False)  # on `device`
    fill_from_dense(model, model_cfg, tp.rank, tp.size, init_state_dict, device)
    model.set_activation_checkpointing(train_cfg.activation_checkpointing)

    def consolidate(engine: Any, names: Collection[str] | None = None) -> dict[str, torch.Tensor] | None:
        from kubellm.training.consolidate import fp32_state_dict

        # the fp32 masters at every ZeRO stage (ZeRO-3: one parameter gathered at a time, not the
        # whole model at once, and not the 16-bit module weights of DeepSpeed's bf16 mode), kept by
        # data-parallel replica 0 only: the other replicas' TP groups skip the TP gather together
        only = None if names is None else set(names).__contains__
        local = fp32_state_dict(engine.module, keep=grid.get_data_parallel_rank() == 0, only=only)  # DP collective
        if local is None:
            return None
        full_sd = gather_state_dict(local, model_cfg, tp, only_first=True)  # TP collective
        return full_sd if dist.get_rank() == 0 else None

    return ParallelModel(module=model, mpu=grid, dp_rank=grid.get_data_parallel_rank(),
                         dp_size=grid.get_data_parallel_world_size(), tp_rank=tp.rank, stage=0, pipeline=False,
                         consolidate=consolidate)
