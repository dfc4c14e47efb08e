"""The seam between the model and tensor parallelism: every weight-bearing layer is built here.

    from kubellm.model.layers import LayerFactory
    model = Transformer(cfg)                         # dense: plain nn.Linear / nn.Embedding
    model = Transformer(cfg, layers=MyTPFactory())   # later: Megatron-style parallel layers

The model never calls `nn.Linear` itself. It asks a `LayerFactory` for four kinds of layer:

* `column(in, parts)` — **column-parallel** candidates: the fused `attn.qkv`, the fused
  `ffn.gate_up`. The output is the concatenation of `parts` along the feature dimension.
* `row(in, out)` — **row-parallel** candidates: `attn.out` and `ffn.down`. Their input is the
  (possibly sharded) output of a column layer; a TP version all-reduces its output.
* `embedding(vocab, dim)` — the token embedding (vocab-parallel later).
* `output(dim, vocab)` — the LM head: `head(x)` returns full logits; `head(x, labels=labels)` returns
  the mean causal-LM loss (the dense `LMHead` fuses it with the projection, never building logits).

**Fused layouts and how to shard them.** A fused weight is stored as its parts stacked along
dim 0 (output features), each part in head order:

* `attn.qkv.weight`: `[q heads (n_heads*hd) | k heads (kv_heads*hd) | v heads (kv_heads*hd)]`, shape
  `((n_heads + 2*kv_heads) * head_dim, dim)`.
* `ffn.gate_up.weight`: `[gate (ffn_dim) | up (ffn_dim)]`, shape `(2*ffn_dim, dim)`.

A column-parallel version must NOT chunk the fused weight contiguously (rank 0 would get only q).
Rank `r` of `tp` takes the `r`-th of `tp` equal chunks **of each part** and concatenates them locally
in the same order, e.g. for qkv: `q[r*nq/tp*hd:(r+1)*nq/tp*hd] | k[r*nkv/tp*hd:...] | v[...]`; the
local attention then sees `n_heads/tp` query heads and `kv_heads/tp` KV heads (so `tp` must divide
both). `factory.tp_size` tells the model how many ways the heads/FFN columns are split;
`shard_fused(weight, parts, rank, tp)` below does exactly this slicing and is what a TP
factory (and a TP-aware checkpoint loader) should use. Row-parallel weights (`attn.out`, `ffn.down`)
are split along dim 1 (input features) in plain contiguous chunks, which matches the head order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kubellm.model.loss import linear_cross_entropy, linear_sequence_logprobs


class LayerFactory:
    """Dense (single-rank) layers. Subclass and override to build tensor-parallel ones."""

    #: How many ways attention heads and FFN columns are split; the model divides its head counts
    #: and FFN width by this to get the per-rank shapes.
    tp_size: int = 1

    def column(self, in_features: int, parts: Sequence[int], *, name: str) -> nn.Module:
        """Linear layer whose output is `parts` concatenated (no bias). `name`: 'qkv' or 'gate_up'."""
        return nn.Linear(in_features, sum(parts), bias=False)

    def row(self, in_features: int, out_features: int, *, name: str) -> nn.Module:
        """Linear layer whose input is sharded under TP (no bias). `name`: 'attn_out' or 'ffn_down'."""
        return nn.Linear(in_features, out_features, bias=False)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size, dim)

    def output(self, dim: int, vocab_size: int) -> nn.Module:
        """The LM head: hidden states (…, dim) -> full logits (…, vocab_size), or the loss given labels."""
        return LMHead(dim, vocab_size)


class LMHead(nn.Linear):
    """`nn.Linear(dim, vocab, bias=False)` (same `weight` key) that can also return the loss:
    `head(x)` -> logits; `head(x, labels=labels)` -> mean cross-entropy over labels != ignore_index,
    through `kubellm.model.loss.linear_cross_entropy` (chunked, no (N, vocab) logits);
    `head(x, labels=labels, sequence_logprobs=True)` -> (B,) summed log p(label) per sequence
    (`linear_sequence_logprobs`). The loss is
    computed inside this module's forward so ZeRO-3's per-module parameter gathering covers it."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,  # type: ignore[override]
                ignore_index: int = -100, sequence_logprobs: bool = False) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        if sequence_logprobs:  # (B,) Σ log p(label) per sequence (DPO)
            return linear_sequence_logprobs(x, self.weight, labels, ignore_index)
        return linear_cross_entropy(x, self.weight, labels, ignore_index)


def shard_fused(weight: torch.Tensor, parts: Sequence[int], rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s slice of a fused column weight laid out as `parts` stacked along dim 0:
    the rank-th of `tp` chunks of each part, concatenated in part order."""
    if weight.shape[0] != sum(parts):
        raise ValueError(f"fused weight has {weight.shape[0]} rows but parts {list(parts)} sum to {sum(parts)}")
    out = []
    for chunk in torch.split(weight, list(parts), dim=0):
        if chunk.shape[0] % tp:
            raise ValueError(f"part of {chunk.shape[0]} rows does not split into tp={tp} equal shards")
        out.append(torch.chunk(chunk, tp, dim=0)[rank])
    return torch.cat(out, dim=0)
