"""The Llama-style decoder: token embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU.

    from kubellm.model import Transformer
    from kubellm.model.config import get_preset
    model = Transformer(get_preset("debug"))
    logits = model(input_ids)                     # (B, T) -> (B, T, vocab), causal
    logits = model(input_ids, doc_ids=doc_ids)    # packed sequences: no attention across documents

Architecture only; parallel layers come in through `kubellm.model.layers.LayerFactory` and the
training loop lives in `kubellm.training`. RoPE uses Hugging Face's half-split layout (`rotate_half`:
pairs are (i, i + head_dim/2), not interleaved (2i, 2i+1)), so weights map to `LlamaForCausalLM`
one to one with no q/k permutation (see `kubellm.model.hf`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kubellm.model.config import ModelConfig
from kubellm.model.layers import LayerFactory


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF Llama does) so bf16 activations do not lose the mean square.
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.type_as(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), fp32, not saved in the state dict."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(torch.device(device))
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, head_dim/2)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        freqs = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)
        # HF stores cat([freqs, freqs]); both halves are equal, so keep one (head_dim/2 wide)
        return freqs.cos(), freqs.sin()

    def reset(self) -> None:
        """Recompute the tables (after materialising a model built on the meta device)."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, position_ids: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) shaped to broadcast over (B, T, heads, head_dim/2) — the projection's layout,
        before the heads are transposed, so q and k heads rotate in one go."""
        if position_ids is None:
            return self.cos[:seq_len][None, :, None], self.sin[:seq_len][None, :, None]  # (1, T, 1, hd/2)
        _check_positions(position_ids, self.max_seq_len)  # here: the model and pipeline stages both index
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        return self.cos[position_ids][:, :, None], self.sin[position_ids][:, :, None]  # (B, T, 1, hd/2)


def _check_positions(position_ids: torch.Tensor, max_seq_len: int) -> None:
    """Positions index the RoPE tables: a negative one would wrap around silently, one past the table
    would fail deep in indexing. Checked eagerly on CPU; on an accelerator, and inside torch.compile
    (where reading the values would break the graph every call), without a host sync: the device or
    the compiled graph raises when it runs the check."""
    msg = f"position_ids must lie in [0, max_seq_len={max_seq_len})"
    if position_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if position_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(position_ids))  # one pass for both ends
            if lo < 0 or hi >= max_seq_len:
                raise ValueError(f"{msg}; got values from {lo} to {hi}")
    elif position_ids.numel():
        torch._assert_async(((position_ids >= 0) & (position_ids < max_seq_len)).all(), msg)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) — HF's `x*cos + rotate_half(x)*sin`, written on the halves
    with half-width tables (one cat, no negation: fewer kernels and less memory traffic)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Preallocated keys/values for incremental decoding: per layer (B, kv_heads, max_len, head_dim).
    `length` is how many positions are filled; `Transformer.forward` advances it."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_heads: int | None = None) -> None:
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, kv_heads or cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, kv_heads, T, hd) after the filled part; return all of it."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, layer_id: int) -> None:
        super().__init__()
        tp = layers.tp_size
        if cfg.n_heads % tp or cfg.kv_heads % tp:
            raise ValueError(f"tp={tp} must divide n_heads={cfg.n_heads} and n_kv_heads={cfg.kv_heads}")
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.n_heads // tp, cfg.kv_heads // tp  # per rank
        hd = self.head_dim
        # Fused [q heads | k heads | v heads]; see kubellm.model.layers for the TP sharding.
        self.qkv = layers.column(cfg.dim, [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd], name="qkv")
        self.out = layers.row(cfg.n_heads * hd, cfg.dim, name="attn_out")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        qk, v = self.qkv(x).split([(nq + nkv) * hd, nkv * hd], dim=-1)
        # rotate the q and k heads together (one set of RoPE kernels per layer, not two)
        qk = apply_rope(qk.view(B, T, nq + nkv, hd), cos, sin)  # (B, T, nq + nkv, hd)
        q = qk[:, :, :nq].transpose(1, 2)  # (B, n_heads, T, hd)
        k = qk[:, :, nq:].transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, n_kv_heads, S, hd), S = cached + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused as [gate | up]."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory) -> None:
        super().__init__()
        if cfg.ffn_dim % layers.tp_size:
            raise ValueError(f"tp={layers.tp_size} must divide ffn_dim={cfg.ffn_dim}")
        self.gate_up = layers.column(cfg.dim, [cfg.ffn_dim, cfg.ffn_dim], name="gate_up")
        self.down = layers.row(cfg.ffn_dim, cfg.dim, name="ffn_down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layers, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg, layers)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache)
        return x + self.ffn(self.ffn_norm(x))


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its (contiguous) document: restarts at 0 where doc_ids changes."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True = may attend: same document and not in the future."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def _w(layer: nn.Module) -> torch.Tensor:
    """A factory-built layer's weight (plain or tensor-parallel layers both expose `.weight`)."""
    return cast(torch.Tensor, layer.weight)


def materialise(module: nn.Module, device: torch.device) -> None:
    """Give every meta-device parameter and buffer of `module` uninitialised storage on `device`.
    Unlike `Module.to_empty`, a parameter keeps its Python attributes (a tensor-parallel weight's
    `tensor_model_parallel`, which DeepSpeed reads) and a tied one stays one parameter."""
    new: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in new:
                q = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                q.__dict__.update(p.__dict__)
                new[id(p)] = q
            m._parameters[name] = new[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)


def init_order(cfg: ModelConfig) -> list[tuple[str, float | None]]:
    """The dense model's parameters in the order their initial values are drawn, each with its
    normal std (None: ones, no draw). A tied output head is the embedding: not listed."""
    std, resid_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    order: list[tuple[str, float | None]] = [("tok_embeddings.weight", std)]
    if not cfg.tie_embeddings:
        order.append(("output.weight", std))
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        order += [(b + "attn.qkv.weight", std), (b + "ffn.gate_up.weight", std), (b + "attn.out.weight", resid_std),
                  (b + "ffn.down.weight", resid_std), (b + "attn_norm.weight", None), (b + "ffn_norm.weight", None)]
    order.append(("norm.weight", None))
    return order


def draw_init(t: torch.Tensor, std: float | None) -> torch.Tensor:
    """One `init_order` entry's initial values, in place."""
    return t.fill_(1.0) if std is None else t.normal_(0.0, std)


@torch.no_grad()
def dense_init_tensors(cfg: ModelConfig, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of the dense model's initial weights one at a time, drawn exactly as
    `Transformer(cfg, device=device)` draws them from the same RNG state: a tensor/pipeline-parallel
    rank keeps its shard of each and drops the rest, never holding the whole model."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).named_parameters()}
    for name, std in init_order(cfg):
        yield name, draw_init(torch.empty(shapes[name], device=device), std)


class Transformer(nn.Module):
    """Decoder-only LM. `forward(input_ids, position_ids=None, doc_ids=None) -> logits (B, T, V)`."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None, *,
                 device: torch.device | str | None = None, init: bool = True) -> None:
        """The layers are created on the meta device and materialised once, on `device` (default:
        torch's default device; under `with torch.device("meta")` they stay there), where the RoPE
        tables are computed too: no layer's own default initialisation runs, so `init_weights` is the
        only draw from the RNG (on `device`'s generator), and a model built for a GPU never passes
        through host memory. `init=False` leaves the weights
        uninitialised for a caller that fills every one (tensor/pipeline-parallel shards)."""
        super().__init__()
        target = torch.device(device) if device is not None else torch.get_default_device()
        layers = layers or LayerFactory()
        self.cfg = cfg
        with torch.device("meta"):
            self.tok_embeddings = layers.embedding(cfg.vocab_size, cfg.dim)
            self.blocks = nn.ModuleList(Block(cfg, layers, i) for i in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = layers.output(cfg.dim, cfg.vocab_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=target)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if target.type != "meta":
            materialise(self, target)
        self.activation_checkpointing = False
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """`init_order`'s draws, in its order: normal(0, init_std) everywhere, the projections that
        write into the residual stream (attn.out, ffn.down) at init_std/sqrt(2*n_layers) so its
        variance does not grow with depth (GPT-2), norms at 1. Also rebuilds the RoPE tables (after a
        meta-device model is materialised).
        Defined for the dense model; `dense_init_tensors` draws the same tensors one at a time."""
        for name, std in init_order(self.cfg):
            draw_init(self.get_parameter(name), std)
        if self.rope.cos.device.type != "meta":
            self.rope.reset()

    def block_list(self) -> list[Block]:
        """`self.blocks` typed as Blocks (a pipeline-parallel stage may hold a slice of them)."""
        return [cast(Block, b) for b in self.blocks]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward (non-reentrant torch.utils.checkpoint)."""
        self.activation_checkpointing = bool(enabled)

    def attention_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                         doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """(cos, sin, mask, is_causal) that every block needs. Separate from `forward` so a
        pipeline-parallel stage that holds only some blocks can compute them itself."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.cfg.max_seq_len
        if start + T > min(limit, self.cfg.max_seq_len):
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}"
                             + (f" or the KV cache's {limit}" if kv_cache is not None else ""))
        mask: torch.Tensor | None = None
        is_causal = True
        if doc_ids is not None:
            if kv_cache is not None:
                raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {(B, T)}")
            mask, is_causal = document_causal_mask(doc_ids), False
            if position_ids is None:
                position_ids = positions_from_doc_ids(doc_ids)
        elif kv_cache is not None and start > 0:
            if position_ids is None:
                position_ids = torch.arange(start, start + T, device=input_ids.device)
            is_causal = False
            if T > 1:  # new token i (absolute start+i) sees cached keys and new keys up to itself
                mask = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device).tril(start)
        cos, sin = self.rope(position_ids, T)
        return cos, sin, mask, is_causal

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                labels: torch.Tensor | None = None, ignore_index: int = -100,
                sequence_logprobs: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). doc_ids (B, T): per-token document index of packed
        sequences (block-diagonal causal attention; positions restart per document unless
        position_ids is given). kv_cache: incremental decoding (see `new_kv_cache`).

        labels (B, T), already shifted (labels[:, t] is the target of position t): return the mean
        cross-entropy over labels != ignore_index instead of logits, through the LM head's fused
        loss (`kubellm.model.loss.linear_cross_entropy`: same value as `causal_lm_loss(logits,
        labels)` without building the (B, T, vocab) logits). With `sequence_logprobs=True`: (B,) Σ_t log
        p(labels[b, t]) over non-ignored labels instead (`linear_sequence_logprobs`; DPO's log-probs)."""
        cos, sin, mask, is_causal = self.attention_inputs(input_ids, position_ids, doc_ids, kv_cache)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, is_causal, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        if labels is not None:
            return self.output(self.norm(x), labels=labels, ignore_index=ignore_index,
                               sequence_logprobs=sequence_logprobs)  # scalar loss, or (B,) log-probs
        return self.output(self.norm(x))  # (B, T, vocab)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = _w(self.tok_embeddings)
        return KVCache(self.cfg, batch_size, max_len, dtype=p.dtype, device=p.device,
                       kv_heads=self.block_list()[0].attn.n_kv_heads)
