"""The model as a DeepSpeed `PipelineModule`: embedding stage, one `LayerSpec` per block, norm, head.

    from kubellm.training.pipeline import build_pipeline, PipelineBatches
    built = build_pipeline(model_cfg, train_cfg, parallel_cfg, init_state_dict)   # collective
    engine, *_ = deepspeed.initialize(model=built.module, model_parameters=..., config=ds)  # no mpu
    loss = engine.train_batch(PipelineBatches(loader))    # grad-accum micro-batches through the stages

The engine takes this path when `parallel.pp > 1` (`kubellm.training.engine.train`); the parity
tests are `pytest tests/parallel -m integration -k pipeline`.

Layer list (index: module; state-dict name inside the PipelineModule → `Transformer` name):

    0        EmbeddingStage  `0.tok_embeddings.weight` → `tok_embeddings.weight`
                             (tied: a TiedLayerSpec "embed", `tied_modules.embed.tok_embeddings.weight`)
    1 … n    BlockStage      `{i}.attn.qkv.weight` → `blocks.{i-1}.attn.qkv.weight`, …
    n+1      NormStage       `{n+1}.weight` → `norm.weight`
    n+2      OutputStage     `{n+2}.output.weight` → `output.weight`
                             (tied: the "embed" TiedLayerSpec again, its table used as the head)

Stages are balanced by parameter count (`parallel.pipeline_partition: parameters`, DeepSpeed's
default), by layer count (`uniform`), or by forward FLOPs (`compute`, `layer_costs`: the embedding
lookup costs nothing though it holds V·d parameters, the head costs 2·V·d per token; with a large
vocabulary, parameter balancing leaves the last stage the slowest). With tied embeddings the first
and last stage each hold a copy of the table; DeepSpeed all-reduces its gradient over the two
(`allreduce_tied_weight_gradients`).
Activations between stages are `x` (B, T, dim), or `(x, position_ids, doc_ids)` when the batch
carries packed-document masking (SFT, pretrain with doc masking); integer tensors get no gradient.

With TP inside PP, the layers are `kubellm.model.parallel` layers whose group is the pipeline grid's
slice-parallel group (bound right after DeepSpeed builds the grid, before the first forward).
Only causal-LM objectives (pretrain, SFT) can run here: the pipeline computes the loss on the last
stage from the logits and the labels alone; DPO needs two sequences and a reference model per
example, so it is refused with PP (use tp/dp/ZeRO for DPO).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kubellm.core.errors import ConfigError
from kubellm.model.config import ModelConfig
from kubellm.model.layers import LayerFactory
from kubellm.model.loss import causal_lm_loss
from kubellm.model.transformer import (
    Block,
    RMSNorm,
    RotaryEmbedding,
    document_causal_mask,
    positions_from_doc_ids,
)
from kubellm.training.config import ParallelConfig, TrainConfig
from kubellm.training.topology import ParallelModel, fill_from_dense

Activations = Tensor | tuple[Tensor, Tensor, Tensor]


class EmbeddingStage(nn.Module):
    """input_ids (or (input_ids, position_ids, doc_ids)) -> embeddings (passing positions/docs on)."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.tok_embeddings = layers.embedding(cfg.vocab_size, cfg.dim)

    def forward(self, inputs: Activations) -> Activations:
        if isinstance(inputs, Tensor):
            return self.tok_embeddings(inputs)  # (B, T, dim)
        if len(inputs) == 1:
            return self.tok_embeddings(inputs[0])
        ids, pos, doc = inputs
        return self.tok_embeddings(ids), pos, doc

    def logits(self, x: Activations) -> Tensor:
        """The table as the LM head (tied embeddings)."""
        h = x if isinstance(x, Tensor) else x[0]
        emb = self.tok_embeddings
        if hasattr(emb, "logits"):  # vocab-parallel: gathers the full vocabulary
            return emb.logits(h)
        return nn.functional.linear(h, emb.weight)  # (B, T, V)


def _tied_head(module: EmbeddingStage, x: Activations) -> Tensor:
    return module.logits(x)


class BlockStage(Block):
    """One transformer block with its own RoPE tables (non-persistent), as a pipeline layer."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory, layer_id: int, activation_checkpointing: bool) -> None:
        super().__init__(cfg, layers, layer_id)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, inputs: Activations) -> Activations:  # type: ignore[override]
        if isinstance(inputs, Tensor):
            x, pos, doc, mask, is_causal = inputs, None, None, None, True
        else:
            x, pos, doc = inputs
            mask, is_causal = document_causal_mask(doc), False
        cos, sin = self.rope(pos, x.shape[1])
        if self.activation_checkpointing and torch.is_grad_enabled():
            y = checkpoint(super().forward, x, cos, sin, mask, is_causal, None, use_reentrant=False)
        else:
            y = super().forward(x, cos, sin, mask, is_causal)
        return y if pos is None or doc is None else (y, pos, doc)


class NormStage(RMSNorm):
    def forward(self, inputs: Activations) -> Tensor:  # type: ignore[override]
        return super().forward(inputs if isinstance(inputs, Tensor) else inputs[0])


class OutputStage(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.output = layers.output(cfg.dim, cfg.vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(x)  # (B, T, V)


def pipeline_loss(logits: Tensor, labels: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """The last stage's loss: the causal-LM loss of pretrain and SFT (labels -100 are ignored).
    `(labels, weight)`: the micro-batch's mean times its token weight (`PipelineBatches.feed`), so
    the step's loss is the mean over every target token of the step, as without pp."""
    if isinstance(labels, tuple | list):
        labels, weight = labels
        return causal_lm_loss(logits, labels) * weight
    return causal_lm_loss(logits, labels)


# -- names: PipelineModule state dict <-> Transformer state dict --------------------------------------------
def to_dense_name(name: str, n_layers: int) -> str:
    """`PipelineModule` state-dict key -> the `Transformer` key it holds."""
    if name.startswith("tied_modules.embed."):
        return name[len("tied_modules.embed."):]
    m = re.match(r"(\d+)\.(.+)", name)
    if not m:
        raise KeyError(f"unexpected pipeline parameter {name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return rest
    if idx <= n_layers:
        return f"blocks.{idx - 1}.{rest}"
    if idx == n_layers + 1:
        return f"norm.{rest}"
    return rest  # n+2: output.weight


# -- data ----------------------------------------------------------------------------------------------------
class PipelineBatches:
    """Adapts an objective's loader to the pipeline engine's `(inputs, labels)` micro-batches and
    counts the tokens it handed out. `feed(batches, weights)` queues one step's micro-batches (read
    by the engine on every rank of the replica); without a queue it reads the loader itself."""

    def __init__(self, loader: Iterator[dict[str, Tensor]], tokens_fn: Any = None) -> None:
        self.loader, self.tokens_fn = loader, tokens_fn
        self.tokens = 0
        self.first: dict[str, Tensor] | None = None
        self.queue: list[tuple[dict[str, Tensor], float | None]] = []

    def feed(self, batches: list[dict[str, Tensor]], weights: list[float] | None = None) -> None:
        """The next step's micro-batches; `weights` (token weights, SFT) scale each one's loss."""
        self.queue = list(zip(batches, weights if weights is not None else [None] * len(batches), strict=True))

    def __iter__(self) -> PipelineBatches:
        return self

    def __next__(self) -> tuple[Any, Any]:
        weight: float | None = None
        if self.queue:
            batch, weight = self.queue.pop(0)
        else:
            batch = next(self.loader)
        if self.first is None:
            self.first = batch
        self.tokens += int(self.tokens_fn(batch)) if self.tokens_fn else int(batch["labels"].numel())
        ids = batch["input_ids"]
        labels: Any = batch["labels"] if weight is None else (batch["labels"], torch.tensor(weight))
        if batch.get("doc_ids") is not None:
            doc = batch["doc_ids"]
            pos = batch.get("position_ids")
            if pos is None:
                pos = positions_from_doc_ids(doc)
            return (ids, pos, doc), labels
        if batch.get("position_ids") is not None:
            raise ValueError("pipeline parallelism passes position_ids only together with doc_ids")
        return ids, labels


#: the stages whose objective a pipeline schedule can run (a causal-LM loss on the last stage)
PIPELINE_STAGES = ("pretrain", "sft")


def no_pipeline_error(what: str) -> ConfigError:
    return ConfigError(
        f"parallel.pp > 1 is not supported for {what}: the pipeline computes the loss on "
        "its last stage from logits and labels (the causal-LM loss of pretrain and SFT); DPO scores "
        "chosen/rejected pairs against a reference model, which that schedule cannot express. "
        "Use parallel.pp=1 with tp, dp and ZeRO for DPO")


def check_objective(objective: Any) -> None:
    """Pipeline parallelism runs causal-LM objectives only (the last stage owns the loss)."""
    from kubellm.pretrain.objective import PretrainObjective
    from kubellm.sft.objective import SFTObjective

    if not isinstance(objective, PretrainObjective | SFTObjective):
        raise no_pipeline_error(type(objective).__name__)


# -- building -------------------------------------------------------------------------------------------------
def layer_specs(cfg: ModelConfig, layers: LayerFactory, activation_checkpointing: bool) -> list[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if cfg.tie_embeddings:
        first: Any = TiedLayerSpec("embed", EmbeddingStage, cfg, layers, tied_weight_attr=["tok_embeddings.weight"])
        last: Any = TiedLayerSpec("embed", EmbeddingStage, cfg, layers, forward_fn=_tied_head,
                                  tied_weight_attr=["tok_embeddings.weight"])
    else:
        first, last = LayerSpec(EmbeddingStage, cfg, layers), LayerSpec(OutputStage, cfg, layers)
    blocks = [LayerSpec(BlockStage, cfg, layers, i, activation_checkpointing) for i in range(cfg.n_layers)]
    return [first, *blocks, LayerSpec(NormStage, cfg.dim, cfg.norm_eps), last]


def layer_costs(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Forward FLOPs per token of each entry of `layer_specs` (embedding, blocks, norm, head)."""
    from kubellm.model.flops import layer_forward_flops

    emb, block, norm, head = layer_forward_flops(cfg, seq_len)
    return [emb, *[block] * cfg.n_layers, norm, head]


def _weighted_pipeline_module(weights: list[int]) -> type:
    """A `PipelineModule` whose "parameters" partition balances `weights` instead of parameter counts
    (DeepSpeed's `partition_balanced` over the per-layer weights `_count_layer_params` returns)."""
    from deepspeed.pipe import PipelineModule

    class WeightedPipelineModule(PipelineModule):  # type: ignore[misc]
        def _count_layer_params(self) -> list[int]:
            if len(weights) != len(self._layer_specs):
                raise ValueError(f"{len(weights)} layer weights for {len(self._layer_specs)} pipeline layers")
            return list(weights)

    return WeightedPipelineModule


def _send_state_dict(sd: dict[str, Tensor], dst: int) -> None:
    """Point-to-point: `sd`'s names, shapes and dtypes, then each tensor (on the collective device)."""
    from kubellm.model.parallel import collective_device

    dist.send_object_list([[(k, tuple(v.shape), v.dtype) for k, v in sd.items()]], dst=dst)
    device = collective_device()
    for v in sd.values():
        dist.send(v.detach().to(device).contiguous(), dst=dst)


def _recv_state_dict(src: int) -> dict[str, Tensor]:
    """The other side of `_send_state_dict`: the tensors on the host."""
    from kubellm.model.parallel import collective_device

    meta: list[Any] = [None]
    dist.recv_object_list(meta, src=src)
    device, out = collective_device(), {}
    for name, shape, dtype in meta[0]:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=src)
        out[name] = buf.cpu()
    return out


def _rng_state(device: str) -> tuple[Tensor, Tensor | None]:
    return torch.random.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: str) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def build_pipeline(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                   init_state_dict: Mapping[str, Tensor] | None = None, partition: str | None = None,
                   device: str = "cpu") -> ParallelModel:
    """The `PipelineModule` for this rank (collective), initialised from the dense weights (drawn on
    `device`, the generator a dense model on it draws from). DeepSpeed builds the stage's layers
    itself, eagerly with their default init (and moves the stage to the accelerator); only this
    stage's layers are kept."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from kubellm.model.parallel import (
        TensorParallelGroup,
        TensorParallelLayers,
        gather_state_dict,
    )

    assert parallel_cfg.dp is not None, "resolve the layout with validate_layout first"
    topo = PipeModelDataParallelTopology(num_pp=parallel_cfg.pp, num_mp=parallel_cfg.tp, num_dp=parallel_cfg.dp)
    coord = topo.get_coord(dist.get_rank())
    tp = TensorParallelGroup(rank=coord.model, size=parallel_cfg.tp)  # group bound below, from the grid
    layers: LayerFactory = TensorParallelLayers(tp) if tp.size > 1 else LayerFactory()
    method = partition or parallel_cfg.pipeline_partition
    specs = layer_specs(model_cfg, layers, train_cfg.activation_checkpointing)
    rng = _rng_state(device)  # DeepSpeed's layer building draws default inits: the dense draws start here
    if method == "compute":
        module: Any = _weighted_pipeline_module(layer_costs(model_cfg, train_cfg.seq_len))(
            layers=specs, topology=topo, loss_fn=pipeline_loss, partition_method="parameters")
    else:
        module = PipelineModule(layers=specs, topology=topo, loss_fn=pipeline_loss, partition_method=method)
    grid = module.mpu()
    tp.group = grid.get_slice_parallel_group()
    n = model_cfg.n_layers
    # this stage's TP shards of the dense weights, drawn (or sliced) one dense tensor at a time
    _set_rng_state(rng, device)
    fill_from_dense(module, model_cfg, tp.rank, tp.size, init_state_dict, device,
                    dense_name=lambda k: to_dense_name(k, n))

    def consolidate(engine: Any, names: Collection[str] | None = None) -> dict[str, Tensor] | None:
        from kubellm.training.consolidate import fp32_state_dict

        wanted = None if names is None else set(names)
        if wanted is not None and model_cfg.tie_embeddings and "output.weight" in wanted:
            wanted.add("tok_embeddings.weight")  # the tied head is the embedding (the first stage's)
        only = None if wanted is None else (lambda k: to_dense_name(k, n) in wanted)
        # one copy per model: data-parallel replica 0 keeps it, the others' TP groups skip the TP gather
        mine = fp32_state_dict(engine.module, keep=grid.get_data_parallel_rank() == 0, only=only)  # DP collective
        if mine is None:
            return None
        dense_named = {to_dense_name(k, n): v for k, v in mine.items()}
        dense_named = gather_state_dict(dense_named, model_cfg, tp, only_first=True)  # TP collective
        # one contribution per stage, from its DP rank 0, TP rank 0, sent to rank 0 alone, tensor by
        # tensor (every rank holding every stage, or a pickled stage on the GPU, would not fit)
        if dist.get_rank() != 0:
            if tp.rank == 0:  # data-parallel rank 0 here
                _send_state_dict(dense_named, dst=0)
            return None
        out: dict[str, Tensor] = dict(dense_named)
        for stage in range(1, grid.get_pipe_parallel_world_size()):
            out.update(_recv_state_dict(src=grid.stage_to_global(stage)))  # rank 0's dp/tp coordinates: 0, 0
        if model_cfg.tie_embeddings and (wanted is None or "output.weight" in wanted):
            out["output.weight"] = out["tok_embeddings.weight"]
        return out if names is None else {k: v for k, v in out.items() if k in set(names)}

    return ParallelModel(module=module, mpu=None, dp_rank=grid.get_data_parallel_rank(),
                         dp_size=grid.get_data_parallel_world_size(), tp_rank=tp.rank, stage=grid.get_stage_id(),
                         pipeline=True, consolidate=consolidate)
