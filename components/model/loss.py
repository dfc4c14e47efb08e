"""Causal LM loss, from logits or fused with the LM head.

    from kubellm.model.loss import causal_lm_loss, linear_cross_entropy
    loss = causal_lm_loss(model(input_ids), labels)        # labels[t] is the target for position t
    loss = model(input_ids, labels=labels)                  # the same mean, through the fused head:
    loss = linear_cross_entropy(hidden, head.weight, labels)  # never builds the (N, vocab) logits

`linear_cross_entropy` is the chunked "fused linear + cross-entropy" the field uses for large
vocabularies (Liger's FusedLinearCrossEntropy, torchtune's chunked CE): the tokens are cut into
chunks whose logits fit in cache, and each chunk's softmax gradient is turned into the hidden-state
and weight gradients right away, in the forward pass. One exp per logit instead of two, no
(N, vocab) logits, log-probs or zero-filled gradient in memory; `bench/bench_train_step.py` measures
what that buys (the logits are ~half of a `seed` step on CPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy over labels != ignore_index, computed in fp32 (bf16 logits lose the
    log-sum-exp's precision). Labels are already shifted by the caller. Returns 0 (with a graph) when
    every label is ignored, instead of NaN, so an all-masked micro-batch cannot poison training."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (flat_labels != ignore_index).sum().clamp(min=1)
    return total / count


#: Bytes of fp32 logits per chunk. On the 2-core dev machine (EPYC, 32 MiB L3) 8 MiB was the fastest
#: of 1–16 MiB for vocab 2k and 10k (1 MiB: +10–35%); the fused head + loss is 1.4–1.8× the unfused
#: one there. On CUDA the point is memory, not cache, so chunks are much larger.
CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def chunk_rows(vocab_size: int, device: torch.device, chunk_bytes: int | None = None) -> int:
    """Rows (tokens) per chunk: the power of two ≥ 16 nearest to `chunk_bytes` of fp32 logits."""
    target = chunk_bytes or CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    rows = target / (4 * vocab_size)
    return max(16, 1 << max(0, round(math.log2(rows))))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of (h @ w.T) against labels, gradients computed chunk by chunk in forward.

    The loss is a scalar mean, so its gradient w.r.t. each chunk's logits is known in forward up to
    the scalar upstream gradient g: (softmax − onehot) · valid / count. Forward computes it, folds it
    into dh (N, D) and dw (V, D) and saves only those; backward scales them by g."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                rows: int) -> torch.Tensor:
        dev = h.device.type
        # under autocast the matmuls run in the autocast dtype (as nn.Linear would), the softmax in fp32
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        hm, wm = h.to(mm_dtype), w.to(mm_dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = labels != ignore_index
        count = valid.sum().clamp(min=1)
        safe = torch.where(valid, labels, torch.zeros_like(labels))[:, None]  # (N, 1), ignored -> 0
        weight = (valid.float() / count)[:, None]  # each token's share of the mean (0 if ignored)
        dh = torch.empty_like(h) if want_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            for s in range(0, h.shape[0], rows):
                e = min(s + rows, h.shape[0])
                x = (hm[s:e] @ wm.t()).float()  # (rows, V) logits of this chunk
                m = x.amax(-1, keepdim=True)
                lab, wt = safe[s:e], weight[s:e]
                target = x.gather(1, lab)
                x.sub_(m).exp_()  # e = unnormalised softmax, in place
                z = x.sum(-1, keepdim=True)
                total += ((z.log() + m - target) * valid[s:e, None]).sum()  # Σ (logsumexp − logit[label])
                if dh is None and dw is None:
                    continue
                # d logits = wt·(e/z − onehot). The row scale wt/z and the onehot term are applied to
                # the small (rows, D) operands instead of the (rows, V) chunk (two fewer passes over it):
                #   dh = (wt/z)·(e @ W) − wt·W[label]      dw += eᵀ @ ((wt/z)·h) − scatter(wt·h at label)
                scale = wt / z
                em, hc = x.to(mm_dtype), h[s:e]
                if dh is not None:
                    dh[s:e] = (em @ wm).float().mul_(scale).sub_(w[lab[:, 0]].float() * wt)
                if dw is not None:
                    hs = (hc.float() * scale).to(mm_dtype)
                    if mm_dtype == torch.float32:
                        dw.addmm_(em.t(), hs)
                    else:  # low-precision product, fp32 accumulation across chunks
                        dw.add_(em.t() @ hs)
                    dw.index_add_(0, lab[:, 0], hc.float() * -wt)
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (dh is not None, dw is not None)
        ctx.w_dtype = w.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        dh = saved.pop(0) * grad if ctx.has[0] else None
        dw = (saved.pop(0) * grad).to(ctx.w_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None


#: Largest per-sequence weight-gradient stash (B × vocab × dim fp32) `linear_sequence_logprobs` keeps
#: to skip recomputing the logits in backward; above it, backward recomputes them (one more matmul).
#: Small on purpose: a stash of tens of MB is a fresh mmap (page faults) every step, which cost as
#: much as the matmul it saves on the `seed` DPO benchmark (bench/bench_dpo.py).
SEQUENCE_GRAD_BYTES = 16 << 20


def _head_grads(x: torch.Tensor, hm: torch.Tensor, wm: torch.Tensor, mm_dtype: torch.dtype,
                dh: torch.Tensor | None, dw: torch.Tensor | None, first: bool = False) -> None:
    """dh = x @ w, dw += x.T @ h (dw = x.T @ h when `first`: no zero-fill needed) for one chunk's
    logit gradient x; dw accumulates in fp32."""
    xm = x.to(mm_dtype)
    if dh is not None:
        dh.copy_(xm @ wm)
    if dw is not None:
        if first:
            dw.copy_(xm.t() @ hm)
        elif mm_dtype == torch.float32:
            dw.addmm_(xm.t(), hm)
        else:
            dw.add_(xm.t() @ hm)


class _LinearSequenceLogprobs(torch.autograd.Function):
    """(B,) Σ_t log p(label_t) of (h @ w.T) per sequence, chunked within each sequence.

    The upstream gradient g_b is per sequence (DPO's weights), so the weight gradient is
    Σ_b g_b · DW_b with DW_b = Σ_{t∈b} (onehot − softmax)_tᵀ h_t. When B × vocab × dim fp32 fits
    in `SEQUENCE_GRAD_BYTES`, forward folds each chunk into dh and DW_b right away (no logits kept,
    no recompute); otherwise it keeps only each row's log-sum-exp and backward recomputes the
    chunk's logits (one extra matmul)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                rows: int) -> torch.Tensor:
        B, T, _ = h.shape
        dev = h.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        valid = labels != ignore_index  # (B, T)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager = (want_h or want_w) and B * w.numel() * 4 <= SEQUENCE_GRAD_BYTES
        out = torch.zeros(B, dtype=torch.float32, device=h.device)
        lse = torch.empty(B, T, dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if eager and want_h else None
        dws = torch.empty((B, *w.shape), dtype=torch.float32, device=w.device) if eager and want_w else None
        with torch.autocast(dev, enabled=False):
            hm, wm = h.to(mm_dtype), w.to(mm_dtype)
            for b in range(B):
                for s in range(0, T, rows):
                    e = min(s + rows, T)
                    v, lab = valid[b, s:e, None].float(), safe[b, s:e, None]
                    x = (hm[b, s:e] @ wm.t()).float()
                    m = x.amax(-1, keepdim=True)
                    target = x.gather(1, lab)
                    x.sub_(m).exp_()
                    z = x.sum(-1, keepdim=True)
                    lse[b, s:e] = (z.log() + m)[:, 0]
                    out[b] += ((target - z.log() - m) * v).sum()
                    if not eager:
                        continue
                    x.mul_(-v / z)  # −softmax (0 where ignored)
                    x.scatter_add_(1, lab, v)  # + onehot: d log p(label) / d logits
                    _head_grads(x, hm[b, s:e], wm, mm_dtype, dh[b, s:e] if dh is not None else None,
                                dws[b] if dws is not None else None, first=s == 0)
        if eager:
            ctx.save_for_backward(*(t for t in (dh, dws) if t is not None))
            ctx.has = (dh is not None, dws is not None)
        else:
            ctx.save_for_backward(h, w, safe, valid, lse)
        ctx.eager, ctx.rows, ctx.mm_dtype, ctx.w_dtype, ctx.w_shape = eager, rows, mm_dtype, w.dtype, w.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g = grad.float()  # (B,)
        if ctx.eager:
            saved = list(ctx.saved_tensors)
            dh = saved.pop(0) * g[:, None, None].to(saved[0].dtype) if ctx.has[0] else None
            dw = (g @ saved.pop(0).flatten(1)).view(ctx.w_shape).to(ctx.w_dtype) if ctx.has[1] else None
            return dh, dw, None, None, None
        h, w, safe, valid, lse = ctx.saved_tensors
        B, T, _ = h.shape
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(h.device.type, enabled=False):
            hm, wm = h.to(ctx.mm_dtype), w.to(ctx.mm_dtype)
            for b in range(B):
                for s in range(0, T, ctx.rows):
                    e = min(s + ctx.rows, T)
                    gv = valid[b, s:e, None] * g[b]
                    x = (hm[b, s:e] @ wm.t()).float()
                    x.sub_(lse[b, s:e, None]).exp_().mul_(-gv)  # −g · softmax
                    x.scatter_add_(1, safe[b, s:e, None], gv)  # + g · onehot
                    _head_grads(x, hm[b, s:e], wm, ctx.mm_dtype, dh[b, s:e] if dh is not None else None, dw)
        return dh, (dw.to(w.dtype) if dw is not None else None), None, None, None


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100, chunk_bytes: int | None = None) -> torch.Tensor:
    """(B,) Σ_t log p(labels[b, t]) under `hidden @ weight.T` over labels != ignore_index — DPO's
    sequence log-probs (`kubellm.dpo.loss.sequence_logprobs` of the logits) without materialising
    them. hidden (B, T, D), labels (B, T)."""
    if hidden.dim() != 3 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states "
                         f"{tuple(hidden.shape[:-1])} (B, T, dim={hidden.shape[-1]})")
    rows = chunk_rows(weight.shape[0], hidden.device, chunk_bytes)
    return _LinearSequenceLogprobs.apply(hidden, weight, labels, ignore_index, rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_bytes: int | None = None) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T, labels)` without materialising the logits.

    hidden (…, D), weight (V, D) (the LM head's), labels (…) already shifted. Same value and
    gradients as the unfused form up to fp32 summation order; 0 (with a graph) when every label is
    ignored."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states "
                         f"{tuple(hidden.shape[:-1])} (…, dim={hidden.shape[-1]})")
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows(weight.shape[0], hidden.device, chunk_bytes)
    return _LinearCrossEntropy.apply(flat, weight, labels.reshape(-1), ignore_index, rows)
