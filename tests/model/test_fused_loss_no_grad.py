"""The fused LM-head losses do no gradient work under `torch.no_grad()` (DPO's reference scoring,
evaluation) even when the weights require grad: `ctx.needs_input_grad` follows `requires_grad`, not the
grad mode, so the full weight gradient (and the sequence log-prob stash) was built and thrown away."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kubellm.model import Transformer, loss
from kubellm.model.config import ModelConfig
from kubellm.model.loss import linear_cross_entropy, linear_sequence_logprobs

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


@pytest.fixture
def contexts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    """Each fused Function's forward ctx, recorded after forward ran."""
    seen: list[tuple[str, Any]] = []
    for cls in (loss._LinearCrossEntropy, loss._LinearSequenceLogprobs):
        original = cls.forward

        def spy(ctx: Any, *args: Any, _orig: Any = original, _name: str = cls.__name__) -> torch.Tensor:
            out = _orig(ctx, *args)
            seen.append((_name, ctx))
            return out

        monkeypatch.setattr(cls, "forward", staticmethod(spy))
    yield seen


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    h = torch.randn(2, 21, 32, requires_grad=True)
    w = (torch.randn(97, 32) * 0.5).requires_grad_()
    labels = torch.randint(0, 97, (2, 21))
    labels[0, :4] = -100
    return h, w, labels


def test_cross_entropy_builds_no_gradients_under_no_grad(contexts: list[tuple[str, Any]]) -> None:
    h, w, labels = _inputs()
    with torch.no_grad():
        got = linear_cross_entropy(h, w, labels, chunk_bytes=16 * 97 * 4)
    assert got.grad_fn is None
    [(name, ctx)] = contexts
    assert name == "_LinearCrossEntropy" and ctx.has == (False, False)  # no dh, no dw computed or saved
    with torch.inference_mode():
        linear_cross_entropy(h, w, labels)
    assert contexts[-1][1].has == (False, False)
    ref = linear_cross_entropy(h, w, labels, chunk_bytes=16 * 97 * 4)  # with grad: the same value, and grads
    assert contexts[-1][1].has == (True, True)
    assert torch.equal(got, ref.detach())
    gh, gw = torch.autograd.grad(ref, [h, w])
    refh, refw = torch.autograd.grad(loss.causal_lm_loss(h @ w.t(), labels), [h, w])
    torch.testing.assert_close(gh, refh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, refw, rtol=1e-5, atol=1e-7)


def test_sequence_logprobs_keep_no_stash_under_no_grad(contexts: list[tuple[str, Any]]) -> None:
    h, w, labels = _inputs()
    with torch.no_grad():
        got = linear_sequence_logprobs(h, w, labels, chunk_bytes=16 * 97 * 4)
    assert got.grad_fn is None
    [(name, ctx)] = contexts
    assert name == "_LinearSequenceLogprobs" and ctx.stash is False  # no (rows, vocab) gradient stash
    ref = linear_sequence_logprobs(h, w, labels, chunk_bytes=16 * 97 * 4)
    assert contexts[-1][1].stash is True
    assert torch.equal(got, ref.detach())
    torch.testing.assert_close(got, loss.sequence_logprobs(h @ w.t(), labels), rtol=1e-5, atol=1e-5)
    g = torch.tensor([0.7, -1.3])
    gh, gw = torch.autograd.grad((ref * g).sum(), [h, w])
    refh, refw = torch.autograd.grad((loss.sequence_logprobs(h @ w.t(), labels) * g).sum(), [h, w])
    torch.testing.assert_close(gh, refh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, refw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sequence_logprobs", [False, True])
def test_model_no_grad_scoring_does_no_gradient_work(sequence_logprobs: bool,
                                                     contexts: list[tuple[str, Any]]) -> None:
    # the model's fused head path, as DPO's no_grad reference scoring calls it
    torch.manual_seed(0)
    m = Transformer(TINY)  # parameters require grad
    ids = torch.randint(0, TINY.vocab_size, (2, 17))
    labels = ids.roll(-1, 1)
    with torch.no_grad():
        got = m(ids, labels=labels, sequence_logprobs=sequence_logprobs)
    assert got.grad_fn is None
    ctx = contexts[-1][1]
    assert (ctx.stash is False) if sequence_logprobs else (ctx.has == (False, False))
    assert torch.equal(got, m(ids, labels=labels, sequence_logprobs=sequence_logprobs).detach())
