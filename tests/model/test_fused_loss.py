"""The LM head's fused, chunked cross-entropy (`model(ids, labels=...)`, `linear_cross_entropy`):
same loss and gradients as logits + `causal_lm_loss`, and no (N, vocab) tensor kept for backward."""

from __future__ import annotations

import pytest
import torch

from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.model.loss import causal_lm_loss, chunk_rows, linear_cross_entropy

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("chunk_bytes", [16 * 97 * 4, 40 * 97 * 4, 1 << 30])  # 16 rows, uneven 32 rows, one chunk
def test_linear_cross_entropy_matches_unfused(chunk_bytes: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(3, 37, 32, requires_grad=True)  # 111 rows: the last chunk is partial
    w = (torch.randn(97, 32) * 0.5).requires_grad_()
    labels = torch.randint(0, 97, (3, 37))
    labels[0, :5] = -100
    labels[2, -3:] = -100
    ref = causal_lm_loss(h @ w.t(), labels)
    got = linear_cross_entropy(h, w, labels, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(_grads(got * 3.0, [h, w]), _grads(ref * 3.0, [h, w]), strict=True):  # upstream grad ≠ 1
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_chunk_rows_fit_the_cache_budget() -> None:
    cpu = torch.device("cpu")
    assert chunk_rows(2048, cpu) == 1024 and chunk_rows(10000, cpu) == 256  # ≈ 8 MiB of fp32 logits
    assert chunk_rows(10**7, cpu) == 16  # never below 16 rows
    assert chunk_rows(97, cpu, chunk_bytes=16 * 97 * 4) == 16


def test_model_labels_path_matches_logits_path_with_tied_embeddings_and_packing() -> None:
    cfg = TINY.with_(tie_embeddings=True)
    torch.manual_seed(0)
    m = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    labels = ids[:, 1:].clone()
    labels[:, :4] = -100
    params = list(m.parameters())
    ref = causal_lm_loss(m(ids[:, :-1], doc_ids=doc), labels)
    got = m(ids[:, :-1], doc_ids=doc, labels=labels)
    assert got.dim() == 0
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(_grads(got, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_is_as_close_to_fp32_as_the_unfused_head() -> None:
    torch.manual_seed(0)
    m = Transformer(TINY)
    ids = torch.randint(0, TINY.vocab_size, (4, 33))
    params = list(m.parameters())
    exact = _grads(causal_lm_loss(m(ids[:, :-1]), ids[:, 1:]), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = causal_lm_loss(m(ids[:, :-1]), ids[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = m(ids[:, :-1], labels=ids[:, 1:])
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, rtol=1e-3, atol=1e-3)
    err = lambda gs: max(float((g - e).norm() / e.norm()) for g, e in zip(gs, exact, strict=True))  # noqa: E731
    e_fused, e_unfused = err(_grads(fused, params)), err(_grads(unfused, params))
    assert e_unfused > 0  # bf16 really ran
    assert e_fused <= 1.5 * e_unfused + 1e-4


def test_fp16_head_gradients_survive_until_the_loss_scale() -> None:
    # DeepSpeed's fp16 multiplies the loss by its scale before backward; the fused head computes its
    # gradients in forward, before that. Folded into fp16 operands, each logit's share ~1/(count·z)
    # flushed to zero, and the softmax part of dW was lost (18% error on rows never a label; 1e-3 here
    # at fp16 like the unfused head).
    torch.manual_seed(0)
    n, d, v, loss_scale = 2048, 64, 8000, 65536.0
    h0, w0 = torch.randn(n, d), torch.randn(v, d) * 0.02
    y = torch.randint(0, v, (n,))

    def grads(dtype: torch.dtype, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = h0.to(dtype).detach().clone().requires_grad_(), w0.to(dtype).detach().clone().requires_grad_()
        loss = linear_cross_entropy(h, w, y) if fused else causal_lm_loss(h @ w.t(), y)
        (loss * loss_scale).backward()
        assert h.grad.dtype == w.grad.dtype == dtype
        return h.grad.float() / loss_scale, w.grad.float() / loss_scale

    ref_h, ref_w = grads(torch.float32, False)
    never = torch.ones(v, dtype=torch.bool)
    never[y] = False
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    plain_h, plain_w = grads(torch.float16, False)
    fused_h, fused_w = grads(torch.float16, True)
    assert rel(fused_w[never], ref_w[never]) <= 2 * rel(plain_w[never], ref_w[never]) + 1e-3
    assert rel(fused_w, ref_w) <= 2 * rel(plain_w, ref_w) + 1e-3
    assert rel(fused_h, ref_h) <= 2 * rel(plain_h, ref_h) + 1e-3


def test_all_ignored_gives_zero_loss_with_zero_grads() -> None:
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((5,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad is not None and w.grad is not None
    assert not h.grad.any() and not w.grad.any()


def test_no_logits_sized_tensor_is_saved_for_backward() -> None:
    torch.manual_seed(0)
    m = Transformer(TINY.with_(vocab_size=4096))
    ids = torch.randint(0, 4096, (4, 33))
    n_logits = 4 * 32 * 4096

    def biggest_saved(fn) -> int:  # type: ignore[no-untyped-def]
        sizes = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    assert biggest_saved(lambda: causal_lm_loss(m(ids[:, :-1]), ids[:, 1:])) >= n_logits
    assert biggest_saved(lambda: m(ids[:, :-1], labels=ids[:, 1:])) < n_logits // 2  # dh (N, D) and dw (V, D); N/D = 4 here


def test_labels_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"labels shape \(2, 5\) does not match hidden states \(2, 6\)"):
        linear_cross_entropy(torch.randn(2, 6, 8), torch.randn(11, 8), torch.zeros(2, 5, dtype=torch.long))


def test_no_grad_computes_only_the_loss() -> None:
    torch.manual_seed(0)
    m = Transformer(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 17))
    with torch.no_grad():
        got = m(ids[:, :-1], labels=ids[:, 1:])
        ref = causal_lm_loss(m(ids[:, :-1]), ids[:, 1:])
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ignored", [True, False])  # rows skipped by the head, or every row computed
@pytest.mark.parametrize("stash", [True, False])  # logit gradients kept from forward, or recomputed
@pytest.mark.parametrize("chunk_bytes", [16 * 97 * 4, 1 << 30])
def test_sequence_logprobs_match_log_softmax_for_per_sequence_gradients(
        chunk_bytes: int, stash: bool, ignored: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubellm.model import loss as L

    monkeypatch.setitem(L.SEQUENCE_STASH_BYTES, "cpu", 1 << 40 if stash else 0)
    torch.manual_seed(0)
    h = torch.randn(4, 21, 32, requires_grad=True)
    w = (torch.randn(97, 32) * 0.5).requires_grad_()
    labels = torch.randint(0, 97, (4, 21))
    if ignored:
        labels[1, :7] = -100
        labels[3, 15:] = -100
    logp = torch.log_softmax(h @ w.t(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = torch.where(labels != -100, logp, 0.0).sum(-1)
    got = L.linear_sequence_logprobs(h, w, labels, chunk_bytes=chunk_bytes)
    assert got.shape == (4,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn(4)  # a different upstream gradient per sequence, as DPO's loss gives
    for g, r in zip(_grads((got * weights).sum(), [h, w]), _grads((ref * weights).sum(), [h, w]), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_model_sequence_logprobs_match_dpo_sequence_logprobs_from_logits() -> None:
    from kubellm.dpo.loss import sequence_logprobs

    torch.manual_seed(0)
    m = Transformer(TINY)
    ids = torch.randint(0, TINY.vocab_size, (3, 17))
    labels = ids[:, 1:].clone()
    labels[:, :5] = -100
    params = list(m.parameters())
    ref = sequence_logprobs(m(ids[:, :-1]), labels)
    got = m(ids[:, :-1], labels=labels, sequence_logprobs=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    loss = lambda lp: -torch.nn.functional.logsigmoid(lp[0] - lp[1]) + 0.3 * lp[2]  # noqa: E731
    for g, r in zip(_grads(loss(got), params), _grads(loss(ref), params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_sequence_logprobs_of_all_ignored_rows_are_zero_with_zero_grads() -> None:
    from kubellm.model.loss import linear_sequence_logprobs

    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    lp = linear_sequence_logprobs(h, w, torch.full((2, 5), -100))
    assert lp.tolist() == [0.0, 0.0]
    (lp * torch.tensor([1.0, -2.0])).sum().backward()
    assert h.grad is not None and w.grad is not None
    assert not h.grad.any() and not w.grad.any()


def test_ignored_rows_never_reach_the_head() -> None:
    """A prompt's rows (ignored labels) get no logits: the stash of logit gradients holds only the
    kept rows, and the mean cross-entropy's head matmuls see only them."""
    from kubellm.model import loss as L

    torch.manual_seed(0)
    h = torch.randn(4, 32, 16, requires_grad=True)
    w = torch.randn(4096, 16, requires_grad=True)
    labels = torch.randint(0, 4096, (4, 32))
    labels[:, :24] = -100  # a quarter of the rows count
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        L.linear_sequence_logprobs(h, w, labels)
    assert max(saved) == 32 * 4096  # kept rows × vocab, not 128 × vocab
    seen: list[int] = []
    real_mm = torch.Tensor.__matmul__

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(a.shape[0])
        return real_mm(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "__matmul__", spy)
        L.linear_cross_entropy(h, w, labels)
    assert seen and max(seen) <= 32
