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


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of log p(label_t) over the positions whose label is not `ignore_index`.

    logits (B, T, V) and labels (B, T) are aligned: labels[:, t] is the target of position t."""
    # log p(label) = −cross_entropy: one fused log-softmax + gather whose backward never builds the
    # (B, T, V) log-prob tensor (the log_softmax + gather form made DPO ~25% slower than SFT per token;
    # bench/bench_dpo.py). Ignored positions come back as 0.
    tok = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                           reduction="none").view_as(labels)  # (B, T)
    return tok.sum(-1)


#: Bytes of fp32 logits per chunk. On the 2-core dev machine (EPYC, 32 MiB L3) 8 MiB was the fastest
#: of 1–16 MiB for vocab 2k and 10k (1 MiB: +10–35%); the fused head + loss is 1.4–1.8× the unfused
#: one there. On CUDA the point is memory, not cache, so chunks are much larger.
CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def chunk_rows(vocab_size: int, device: torch.device, chunk_bytes: int | None = None) -> int:
    """Rows (tokens) per chunk: the power of two ≥ 16 nearest to `chunk_bytes` of fp32 logits."""
    target = chunk_bytes or CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    rows = target / (4 * vocab_size)
    return max(16, 1 << max(0, round(math.log2(rows))))


def kept_rows(valid: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows whose label counts, or None to run the head over every row.

    On CPU the head skips ignored rows (an SFT or DPO prompt, often half the tokens): their logits
    add nothing to the loss or the gradients, and the head is ~half of a small model's step. Elsewhere
    it never does: finding them needs the count on the host, a sync in the hot loop."""
    if valid.device.type != "cpu" or bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _scatter_rows(kept: torch.Tensor, idx: torch.Tensor | None, n: int) -> torch.Tensor:
    """(n, D) with `kept` at rows `idx` and zeros elsewhere (`kept` itself when idx is None)."""
    if idx is None:
        return kept
    return kept.new_zeros(n, kept.shape[1]).index_copy_(0, idx, kept)


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: the autocast dtype under autocast (as nn.Linear would), else h's."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def _add_product(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dw (fp32) += a @ b: in place for fp32 operands; a low-precision product accumulated in fp32."""
    if a.dtype == torch.float32:
        dw.addmm_(a, b)
    else:
        dw.add_(a @ b)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of (h @ w.T) against labels, gradients computed chunk by chunk in forward.

    The loss is a scalar mean, so its gradient w.r.t. each chunk's logits is known in forward up to
    the scalar upstream gradient g: (softmax − onehot) · valid / count. Forward computes it, folds it
    into dh (N, D) and dw (V, D) and saves only those; backward scales them by g. `grad_enabled` is
    the caller's grad mode (forward itself always runs with grad disabled): without it, as under
    `torch.no_grad()`, no gradient is computed even for inputs that require one."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                rows: int, grad_enabled: bool) -> torch.Tensor:
        dev = h.device.type
        mm_dtype = _matmul_dtype(h)  # the softmax runs in fp32 either way
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        valid = labels != ignore_index
        count = valid.sum().clamp(min=1)
        idx = kept_rows(valid)
        hk = h if idx is None else h.index_select(0, idx)
        lk, vk = (labels, valid) if idx is None else (labels.index_select(0, idx), valid.index_select(0, idx))
        hm, wm = hk.to(mm_dtype), w.to(mm_dtype)
        safe = torch.where(vk, lk, torch.zeros_like(lk))[:, None]  # (N, 1), ignored -> 0
        weight = (vk.float() / count)[:, None]  # each token's share of the mean (0 if ignored)
        # fp16 cannot hold these gradients before backward's upstream gradient (DeepSpeed's loss scale)
        # multiplies them: ~1/(count·z) per logit is far below its smallest normal (6e-5), so they are
        # kept, and the dw product taken, in fp32. bf16 has fp32's range and keeps the fast path.
        fp16 = mm_dtype == torch.float16
        dh = torch.empty(hk.shape, dtype=torch.float32 if fp16 else hk.dtype, device=hk.device) if want_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            for s in range(0, hk.shape[0], rows):
                e = min(s + rows, hk.shape[0])
                x = (hm[s:e] @ wm.t()).float()  # (rows, V) logits of this chunk
                m = x.amax(-1, keepdim=True)
                lab, wt = safe[s:e], weight[s:e]
                target = x.gather(1, lab)
                x.sub_(m).exp_()  # e = unnormalised softmax, in place
                z = x.sum(-1, keepdim=True)
                total += ((z.log() + m - target) * vk[s:e, None]).sum()  # Σ (logsumexp − logit[label])
                if dh is None and dw is None:
                    continue
                # d logits = wt·(e/z − onehot). The row scale wt/z and the onehot term are applied to
                # the small (rows, D) operands instead of the (rows, V) chunk (two fewer passes over it):
                #   dh = (wt/z)·(e @ W) − wt·W[label]      dw += eᵀ @ ((wt/z)·h) − scatter(wt·h at label)
                scale = wt / z
                em, hc = x.to(mm_dtype), hk[s:e]
                if dh is not None:
                    dh[s:e] = (em @ wm).float().mul_(scale).sub_(w[lab[:, 0]].float() * wt)
                if dw is not None:
                    if fp16:
                        dw.addmm_(x.t(), hc.float() * scale)
                    else:
                        _add_product(dw, em.t(), (hc.float() * scale).to(mm_dtype))
                    dw.index_add_(0, lab[:, 0], hc.float() * -wt)
        if dh is not None:
            dh = _scatter_rows(dh, idx, h.shape[0])
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (dh is not None, dw is not None)
        ctx.w_dtype, ctx.h_dtype = w.dtype, h.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        dh = (saved.pop(0) * grad).to(ctx.h_dtype) if ctx.has[0] else None
        dw = (saved.pop(0) * grad).to(ctx.w_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None, None


#: Largest stash of logit gradients (kept rows × vocab, fp32) `linear_sequence_logprobs` keeps from
#: forward so backward needs no second logits matmul; above it, backward recomputes them. On CPU it
#: stays under glibc's largest dynamic mmap threshold (32 MiB), so the allocation is reused from the
#: heap instead of being a fresh mmap whose page faults cost as much as the matmul it saves (measured
#: on the `seed` DPO benchmark, bench/bench_dpo.py).
SEQUENCE_STASH_BYTES = {"cpu": 30 << 20, "cuda": 256 << 20}


class _LinearSequenceLogprobs(torch.autograd.Function):
    """(B,) Σ_t log p(label_t) of (h @ w.T) per sequence, chunked over the (kept) rows.

    The upstream gradient g_b is per sequence (DPO's weights), so it is only known in backward:
    dh_t = g_b(t) · X_t @ W and dW = Xᵀ (g ⊙ h), with X = onehot − softmax the gradient of the
    log-probs w.r.t. the logits. Forward keeps X when it fits `SEQUENCE_STASH_BYTES` (then the head
    costs the same three matmuls as the mean cross-entropy's), else only each row's log-sum-exp,
    and backward recomputes X chunk by chunk (one more matmul). Under the caller's
    `grad_enabled=False` (`torch.no_grad()`: DPO's reference scoring) X is never built."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                rows: int, grad_enabled: bool) -> torch.Tensor:
        B, T, D = h.shape
        dev = h.device.type
        mm_dtype = _matmul_dtype(h)
        flat_h, flat_l = h.reshape(B * T, D), labels.reshape(B * T)
        valid = flat_l != ignore_index
        idx = kept_rows(valid)
        seq = torch.arange(B, device=h.device).repeat_interleave(T)  # the sequence of each row
        if idx is not None:
            flat_h, flat_l, valid, seq = (t.index_select(0, idx) for t in (flat_h, flat_l, valid, seq))
        n, v = flat_h.shape[0], valid[:, None].float()
        safe = torch.where(valid, flat_l, torch.zeros_like(flat_l))[:, None]
        want_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        stash = want_grad and n * w.shape[0] * 4 <= SEQUENCE_STASH_BYTES.get(dev, SEQUENCE_STASH_BYTES["cuda"])
        grads = torch.empty(n, w.shape[0], dtype=torch.float32, device=h.device) if stash else None
        lse = torch.empty(n, 1, dtype=torch.float32, device=h.device)
        tok = torch.empty(n, 1, dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            hm, wm = flat_h.to(mm_dtype), w.to(mm_dtype)
            for s in range(0, n, rows):
                e = min(s + rows, n)
                lab = safe[s:e]
                chunk = grads[s:e] if grads is not None else None  # this chunk's rows of the stash
                if chunk is not None and mm_dtype == torch.float32:
                    x = torch.mm(hm[s:e], wm.t(), out=chunk)  # fp32 logits land in the stash directly
                else:
                    x = (hm[s:e] @ wm.t()).float()
                m = x.amax(-1, keepdim=True)
                target = x.gather(1, lab)
                x.sub_(m).exp_()
                z = x.sum(-1, keepdim=True)
                lse[s:e] = z.log() + m
                tok[s:e] = (target - lse[s:e]) * v[s:e]
                if chunk is not None:
                    x.mul_(-v[s:e] / z).scatter_add_(1, lab, v[s:e])  # onehot − softmax (0 where ignored)
                    if x is not chunk:
                        chunk.copy_(x)
        out = torch.zeros(B, dtype=torch.float32, device=h.device).index_add_(0, seq, tok[:, 0])
        ctx.save_for_backward(flat_h, w, safe, v, seq, lse if grads is None else grads)
        ctx.idx, ctx.stash, ctx.rows, ctx.mm_dtype, ctx.shape = idx, grads is not None, rows, mm_dtype, h.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat_h, w, safe, v, seq, saved = ctx.saved_tensors
        gk = grad.float()[seq][:, None]  # (n, 1): each row's sequence's upstream gradient
        n = flat_h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty(n, flat_h.shape[1], dtype=torch.float32, device=flat_h.device) if want_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        with torch.autocast(flat_h.device.type, enabled=False):
            hm, wm = flat_h.to(ctx.mm_dtype), w.to(ctx.mm_dtype)
            for s in range(0, n, ctx.rows):
                e = min(s + ctx.rows, n)
                if ctx.stash:
                    x = saved[s:e]  # onehot − softmax; g is applied to the (rows, D) operands below
                else:
                    x = (hm[s:e] @ wm.t()).float()
                    x.sub_(saved[s:e]).exp_().mul_(-v[s:e])
                    x.scatter_add_(1, safe[s:e], v[s:e])
                xm = x.to(ctx.mm_dtype)
                if dh is not None:
                    dh[s:e] = (xm @ wm).float().mul_(gk[s:e])
                if dw is not None:
                    _add_product(dw, xm.t(), (hm[s:e].float() * gk[s:e]).to(ctx.mm_dtype))
        B, T, D = ctx.shape
        dh_out = _scatter_rows(dh, ctx.idx, B * T).view(B, T, D).to(flat_h.dtype) if dh is not None else None
        return dh_out, (dw.to(w.dtype) if dw is not None else None), None, None, None, None


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int = -100, chunk_bytes: int | None = None) -> torch.Tensor:
    """(B,) Σ_t log p(labels[b, t]) under `hidden @ weight.T` over labels != ignore_index — DPO's
    sequence log-probs (`sequence_logprobs` of the logits) without materialising
    them. hidden (B, T, D), labels (B, T)."""
    if hidden.dim() != 3 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states "
                         f"{tuple(hidden.shape[:-1])} (B, T, dim={hidden.shape[-1]})")
    rows = chunk_rows(weight.shape[0], hidden.device, chunk_bytes)
    # the grad mode is read here: inside forward it is always off
    return _LinearSequenceLogprobs.apply(hidden, weight, labels, ignore_index, rows, torch.is_grad_enabled())


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
    # the grad mode is read here: inside forward it is always off
    return _LinearCrossEntropy.apply(flat, weight, labels.reshape(-1), ignore_index, rows, torch.is_grad_enabled())
