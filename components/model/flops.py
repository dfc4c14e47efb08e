"""Parameter count and training FLOPs per token, from the config alone (no model built).

    from kubellm.model.flops import num_params, flops_per_token, layer_forward_flops
    n = num_params(get_preset("1b"))
    mfu = flops_per_token(cfg, seq_len) * tokens_per_s / peak_flops
    emb, block, norm, head = layer_forward_flops(cfg, seq_len)   # per token, forward; balances pp stages
"""

from __future__ import annotations

from kubellm.model.config import ModelConfig


def _block_params(cfg: ModelConfig) -> int:
    d, hd = cfg.dim, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * d  # qkv + out
    ffn = d * 2 * cfg.ffn_dim + cfg.ffn_dim * d  # gate_up + down
    return attn + ffn + 2 * d  # + two RMSNorm weights


def num_params(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Unique parameters of `Transformer(cfg)` (a tied embedding/output matrix counts once).
    With include_embeddings=False: the "non-embedding" count (Kaplan et al.) — the token embedding
    and the output head are both left out."""
    body = cfg.n_layers * _block_params(cfg) + cfg.dim  # blocks + final norm
    if not include_embeddings:
        return body
    emb = cfg.vocab_size * cfg.dim
    return body + (emb if cfg.tie_embeddings else 2 * emb)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) = 6·N + 12·L·d·T, the PaLM (Chowdhery et al.,
    appendix B) / nanoGPT convention: N counts the parameters that take part in a matmul — every
    non-embedding weight plus the output head (V·d, tied or not); the embedding lookup does none.
    12·L·d·T is the attention scores and weighted sum (QKᵀ and AV, 2·2·d·T FLOPs per layer forward,
    ×3 for backward) over the full T×T square, i.e. not halved for the causal mask. Norms and
    element-wise work are ignored, as in both references."""
    n_matmul = num_params(cfg, include_embeddings=False) + cfg.vocab_size * cfg.dim
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len


def layer_forward_flops(cfg: ModelConfig, seq_len: int) -> tuple[int, int, int, int]:
    """Forward FLOPs per token of (the embedding lookup, one block, the final norm, the LM head), in
    `flops_per_token`'s convention: 3 × (emb + n_layers·block + norm + head) == flops_per_token.
    The lookup does no matmul (0); the head does 2·V·d whether or not it is tied to the embedding."""
    block = 2 * _block_params(cfg) + 4 * cfg.dim * seq_len
    return 0, block, 2 * cfg.dim, 2 * cfg.vocab_size * cfg.dim
