"""Megatron-style tensor-parallel layers, plugged into the model through its `LayerFactory` seam.

    from kubellm.model.parallel import TensorParallelGroup, TensorParallelLayers, shard_state_dict
    tp = TensorParallelGroup(rank=grid.get_slice_parallel_rank(), size=2, group=grid.get_slice_parallel_group())
    model = Transformer(cfg, layers=TensorParallelLayers(tp))         # per-rank shards of every matrix
    model.load_state_dict(shard_state_dict(dense.state_dict(), cfg, tp.rank, tp.size))
    full = gather_state_dict(model.state_dict(), cfg, tp)             # collective: the dense weights

Run the parity tests with `pytest tests/parallel -m integration` (gloo, CPU). The engine builds these
layers itself when `parallel.tp > 1` (see `kubellm.training.topology.build_parallel_model`).

How each layer splits (rank r of tp; Megatron-LM's column/row scheme, so one all-reduce per
attention and one per FFN in forward, and one each in backward):

* `ColumnParallelLinear` (`attn.qkv`, `ffn.gate_up`): the r-th chunk of **each fused part** of the
  output features (see `kubellm.model.layers.shard_fused`), so rank r holds q/k/v of heads
  `r*n/tp … (r+1)*n/tp` and the attention runs on those heads locally. Input: identity forward,
  all-reduce of the input gradient in backward (`copy_to_tp`).
* `RowParallelLinear` (`attn.out`, `ffn.down`): the r-th contiguous chunk of the input features;
  the partial outputs are summed with an all-reduce in forward (`reduce_from_tp`).
* `VocabParallelEmbedding`: rows `r*V/tp … (r+1)*V/tp` of the table; ids outside the range look up
  zeros and an all-reduce assembles the full embedding.
* `VocabParallelOutput` (LM head, tied or not): the same vocabulary slice; it **gathers** the
  logits to the full vocabulary (all-gather in forward, own slice of the gradient in backward).
  Why gather instead of a vocab-parallel cross-entropy: the model's contract is full `(B, T, V)`
  logits, and pretrain, SFT (masked labels) and DPO (sequence log-probs) all compute their losses
  from them; the cost is one (B, T, V) all-gather per micro-batch — fine up to ~32k vocab.

Every sharded parameter carries DeepSpeed's `tensor_model_parallel=True` (plus `partition_dim`,
`partition_stride`), which `deepspeed.runtime.utils.is_model_parallel_parameter` reads: the global
gradient norm then counts sharded parameters on every TP rank and replicated ones (norms) once, and
ZeRO partitions over the data-parallel group only (the `mpu` / pipeline grid says which ranks that is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kubellm.model.config import ModelConfig
from kubellm.model.layers import LayerFactory, shard_fused
from kubellm.model.loss import causal_lm_loss
from kubellm.model.loss import sequence_logprobs as summed_logprobs  # the keyword below shadows the name


@dataclasses.dataclass
class TensorParallelGroup:
    """This rank's place in its tensor-parallel group. `group` may be bound after the layers are
    built (a `PipelineModule` creates its grid, and so the slice group, while building the layers);
    it is needed only from the first forward on."""

    rank: int
    size: int
    group: Any = None

    def require_group(self) -> Any:
        if self.group is None and self.size > 1:
            raise RuntimeError("tensor-parallel layers used before their process group was bound "
                               "(TensorParallelGroup.group is None)")
        return self.group


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor must be for a collective over `group`: the current CUDA device under NCCL (an
    NCCL process group has no CPU backend: a host tensor raises), the host under gloo. Host-side values
    (loss sums, token counts, gathered fp32 masters) are moved there for the call and read back after."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- the four communication ops (autograd functions) -----------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce the gradient in backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.tp.require_group())
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum of partial outputs); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=tp.require_group())
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim in forward; this rank's slice of the gradient in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
        ctx.tp = tp
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(tp.size)]
        dist.all_gather(parts, x, group=tp.require_group())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every TP rank computed the same loss from the same full logits, so its gradient is already
        # complete: no reduction, just the slice this rank produced
        return grad.chunk(ctx.tp.size, dim=-1)[ctx.tp.rank].contiguous(), None


def copy_to_tp(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    return x if tp.size == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def gather_from_tp(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherFromTP.apply(x, tp)


def mark_tensor_parallel(p: torch.Tensor, partition_dim: int) -> torch.Tensor:
    """The attributes DeepSpeed (and Megatron) read to tell a sharded parameter from a replicated one."""
    p.tensor_model_parallel = True  # type: ignore[attr-defined]
    p.partition_dim = partition_dim  # type: ignore[attr-defined]
    p.partition_stride = 1  # type: ignore[attr-defined]
    return p


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tp={tp}")
    return n // tp


# -- layers -------------------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """y_local = x @ W_local^T with W_local = this rank's chunk of each fused part (no bias)."""

    def __init__(self, in_features: int, parts: Sequence[int], tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp, self.parts = tp, list(parts)
        local = sum(_split(p, tp.size, "column part") for p in parts)
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(local, in_features)), 0)  # (out/tp, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp), self.weight)  # (…, out/tp)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T), W_local = this rank's input-feature chunk (no bias)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        local = _split(in_features, tp.size, "row in_features")
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features, local)), 1)  # (out, in/tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (…, in/tp)
        return reduce_from_tp(F.linear(x, self.weight), self.tp)  # (…, out)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the embedding table; all-reduce assembles the lookup.
    An `nn.Embedding` subclass so code that treats embeddings specially (no weight decay in
    `kubellm.training.optim.param_groups`) sees it as one."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallelGroup) -> None:
        local = _split(vocab_size, tp.size, "vocab_size")
        super().__init__(local, dim)  # weight: (V/tp, dim)
        self.tp = tp
        self.start, self.end = tp.rank * local, (tp.rank + 1) * local
        mark_tensor_parallel(self.weight, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.start) | (input_ids >= self.end)
        local_ids = (input_ids - self.start).masked_fill(outside, 0)
        x = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)  # (B, T, dim)
        return reduce_from_tp(x, self.tp)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Use the table as the LM head (tied embeddings): full (…, V) logits."""
        return gather_from_tp(F.linear(copy_to_tp(x, self.tp), self.weight), self.tp)


class VocabParallelOutput(nn.Module):
    """LM head over this rank's vocabulary slice; returns the gathered full-vocabulary logits."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        local = _split(vocab_size, tp.size, "vocab_size")
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(local, dim)), 0)  # (V/tp, dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100,
                sequence_logprobs: bool = False) -> torch.Tensor:
        logits = gather_from_tp(F.linear(copy_to_tp(x, self.tp), self.weight), self.tp)  # (…, V)
        if labels is None:
            return logits
        if sequence_logprobs:  # same values as the dense LMHead's
            return summed_logprobs(logits, labels, ignore_index)
        return causal_lm_loss(logits, labels, ignore_index)  # same mean as the dense LMHead


class TensorParallelLayers(LayerFactory):
    """The model's layer factory for one TP rank."""

    def __init__(self, tp: TensorParallelGroup) -> None:
        self.tp = tp
        self.tp_size = tp.size

    def column(self, in_features: int, parts: Sequence[int], *, name: str) -> nn.Module:
        return ColumnParallelLinear(in_features, parts, self.tp)

    def row(self, in_features: int, out_features: int, *, name: str) -> nn.Module:
        return RowParallelLinear(in_features, out_features, self.tp)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return VocabParallelEmbedding(vocab_size, dim, self.tp)

    def output(self, dim: int, vocab_size: int) -> nn.Module:
        return VocabParallelOutput(dim, vocab_size, self.tp)


# -- sharding a dense state dict, and gathering it back ------------------------------------------------------
def tp_split_of(name: str, cfg: ModelConfig) -> tuple[int, list[int] | None] | None:
    """How the dense parameter `name` (a `Transformer` state-dict key, any prefix) is split under TP:
    (dim, fused parts or None for a plain contiguous split), or None when it is replicated."""
    hd = cfg.head_dim
    if name.endswith("attn.qkv.weight"):
        return 0, [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]
    if name.endswith("ffn.gate_up.weight"):
        return 0, [cfg.ffn_dim, cfg.ffn_dim]
    if name.endswith(("attn.out.weight", "ffn.down.weight")):
        return 1, None
    if name.endswith(("tok_embeddings.weight", "output.weight")):
        return 0, None
    return None


def shard_tensor(name: str, t: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    split = tp_split_of(name, cfg)
    if split is None or tp == 1:
        return t
    dim, parts = split
    if parts is not None:
        return shard_fused(t, parts, rank, tp).clone()
    return torch.chunk(t, tp, dim=dim)[rank].clone()


def shard_state_dict(full: Mapping[str, torch.Tensor], cfg: ModelConfig, rank: int,
                     tp: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s shards of a dense `Transformer` state dict (replicated tensors as they are)."""
    return {k: shard_tensor(k, v, cfg, rank, tp) for k, v in full.items()}


def unshard_tensor(name: str, shards: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Inverse of `shard_tensor`: the dense tensor from all TP ranks' shards (in rank order)."""
    split = tp_split_of(name, cfg)
    tp = len(shards)
    if split is None or tp == 1:
        return shards[0]
    dim, parts = split
    if parts is None:
        return torch.cat(list(shards), dim=dim)
    local_parts = [p // tp for p in parts]
    per_rank = [torch.split(s, local_parts, dim=0) for s in shards]  # [rank][part]
    return torch.cat([torch.cat([per_rank[r][i] for r in range(tp)], dim=0) for i in range(len(parts))], dim=0)


def gather_state_dict(local: Mapping[str, torch.Tensor], cfg: ModelConfig, tp: TensorParallelGroup,
                      only_first: bool = False) -> dict[str, torch.Tensor]:
    """Collective over the TP group: the dense state dict (CPU) from every rank's shards, on every TP
    rank, or with `only_first` on TP rank 0 alone (the others get {}; an export needs one copy, not
    one per TP rank of a node)."""
    out: dict[str, torch.Tensor] = {}
    keep = not only_first or tp.rank == 0
    for name, t in local.items():  # same key order on every TP rank
        if tp.size == 1 or tp_split_of(name, cfg) is None:
            if keep:
                out[name] = t.detach().cpu().clone()
            continue
        group = tp.require_group()
        t = t.detach().to(collective_device(group)).contiguous()
        shards = [torch.empty_like(t) for _ in range(tp.size)] if keep else None
        if only_first:
            dist.gather(t, shards, dst=dist.get_global_rank(group, 0), group=group)
        else:
            dist.all_gather(shards, t, group=group)
        if shards is not None:
            out[name] = unshard_tensor(name, [s.cpu() for s in shards], cfg)
    return out


def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """Refuse a model shape `tp` does not divide, naming the numbers (a ValueError; the engine's
    layout check wraps it into a ConfigError)."""
    problems = [f"{what}={n}" for what, n in [("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads),
                                              ("ffn_dim", cfg.ffn_dim), ("vocab_size", cfg.vocab_size)]
                if n % tp]
    if problems:
        raise ValueError(f"parallel.tp={tp} must divide {', '.join(problems)} (attention heads, KV heads, "
                         "FFN columns and vocabulary rows are split evenly across the TP group)")
