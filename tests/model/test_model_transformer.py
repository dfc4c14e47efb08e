"""The decoder: causality, packed-document masking, KV cache, checkpointing, init, loss, checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kubellm.core.errors import InputDataError
from kubellm.model import Transformer, check_token_ids
from kubellm.model.config import ModelConfig
from kubellm.model.layers import shard_fused
from kubellm.model.loss import causal_lm_loss
from kubellm.model.transformer import positions_from_doc_ids

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def test_forward_shape_and_causality() -> None:
    m = _model()
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    y = m(x)
    assert y.shape == (2, 16, TINY.vocab_size)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % TINY.vocab_size
    y2 = m(x2)
    torch.testing.assert_close(y[:, :10], y2[:, :10])
    assert not torch.allclose(y[:, 10:], y2[:, 10:])


def test_positions_restart_per_document() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert positions_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]


def test_packed_documents_do_not_attend_across() -> None:
    m = _model()
    a = torch.randint(0, TINY.vocab_size, (1, 7))
    b = torch.randint(0, TINY.vocab_size, (1, 12))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 7 + [1] * 12])
    y = m(packed, doc_ids=doc)
    torch.testing.assert_close(y[:, :7], m(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:, 7:], m(b), atol=1e-5, rtol=1e-5)
    # Without doc_ids the second document does see the first.
    assert not torch.allclose(m(packed)[:, 7:], m(b), atol=1e-4)


def test_explicit_position_ids_override() -> None:
    m = _model()
    x = torch.randint(0, TINY.vocab_size, (1, 8))
    torch.testing.assert_close(m(x, position_ids=torch.arange(8)[None]), m(x))
    # RoPE is relative: a uniform shift changes nothing, a restart does.
    torch.testing.assert_close(m(x, position_ids=torch.arange(3, 11)[None]), m(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(x, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])), m(x))


@pytest.mark.parametrize("positions", [[0, 1, 2, -1], [0, 1, 2, TINY.max_seq_len]])
def test_out_of_range_position_ids_are_refused(positions: list[int]) -> None:
    """-1 would silently rotate by the table's last row, max_seq_len would fail inside indexing."""
    x = torch.randint(0, TINY.vocab_size, (1, 4))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, max_seq_len=64\); got values from"):
        _model()(x, position_ids=torch.tensor([positions]))
    # pipeline-parallel stages index the tables through the same module
    from kubellm.model.transformer import RotaryEmbedding

    with pytest.raises(ValueError, match=r"position_ids must lie in"):
        RotaryEmbedding(TINY.head_dim, TINY.max_seq_len, TINY.rope_theta)(torch.tensor([positions]), 4)


def test_kv_cache_matches_full_forward() -> None:
    m = _model().eval()
    x = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        full = m(x)
        cache = m.new_kv_cache(2)
        parts = [m(x[:, :6], kv_cache=cache), m(x[:, 6:9], kv_cache=cache)]  # prefill, then a chunk
        parts += [m(x[:, t : t + 1], kv_cache=cache) for t in range(9, 20)]  # one token at a time
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_too_long_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="max_seq_len=64"):
        _model()(torch.zeros(1, 65, dtype=torch.long))


def test_activation_checkpointing_gives_same_gradients() -> None:
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    labels = torch.randint(0, TINY.vocab_size, (2, 16))
    grads = []
    for ac in (False, True):
        m = _model()
        m.set_activation_checkpointing(ac)
        causal_lm_loss(m(x), labels).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_init_scales_residual_projections() -> None:
    cfg = ModelConfig(vocab_size=64, dim=256, n_layers=8, n_heads=4, ffn_dim=256, max_seq_len=16)
    m = _model(cfg)
    resid = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert m.blocks[3].attn.out.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert m.blocks[3].ffn.down.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert m.blocks[3].attn.qkv.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert torch.equal(m.blocks[0].attn_norm.weight, torch.ones(cfg.dim))


def test_tied_embeddings_share_one_tensor() -> None:
    m = _model(TINY.with_(tie_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    assert len(list(m.parameters())) == len(list(_model().parameters())) - 1


def test_training_steps_lower_the_loss() -> None:
    m = _model()
    x = torch.randint(0, TINY.vocab_size, (4, 24))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = causal_lm_loss(m(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0] - 0.5
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters())


def test_loss_ignores_masked_labels_in_fp32() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    bf16 = causal_lm_loss(logits.bfloat16(), labels)
    assert bf16.dtype == torch.float32
    all_masked = causal_lm_loss(logits.requires_grad_(), torch.full_like(labels, -100))
    assert all_masked.item() == 0.0
    all_masked.backward()


def test_check_token_ids_names_where_and_value() -> None:
    check_token_ids(torch.tensor([[0, 5, 96]]), 97, where="ok")
    with pytest.raises(InputDataError, match=r"shard-7\.tok: token id 120 at position \[1, 2\]"):
        check_token_ids(torch.tensor([[0, 1, 2], [3, 4, 120]]), 97, where="shard-7.tok")
    with pytest.raises(InputDataError, match="token id -1"):
        check_token_ids(torch.tensor([-1]), 97)


@pytest.mark.parametrize("bad, match", [
    (dict(dim=30, n_heads=4), "must divide dim"),
    (dict(n_heads=4, n_kv_heads=3), "must divide n_heads"),
])
def test_bad_shapes_fail_in_config(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TINY.with_(**bad)


@pytest.mark.parametrize("field, value", [
    ("rope_theta", 0.0), ("rope_theta", -10000.0), ("norm_eps", 0.0), ("norm_eps", -1e-5), ("init_std", -0.02),
])
def test_nonpositive_rope_theta_norm_eps_init_std_refused_naming_the_field(field: str, value: float) -> None:
    # rope_theta <= 0 gave NaN/inf rotary frequencies, norm_eps <= 0 divides by zero on a zero row
    from kubellm.model.config import ModelSpec

    with pytest.raises(ValueError, match=f"{field}[\\s\\S]*greater than 0"):
        ModelSpec(preset="debug", overrides={field: value})


def test_shard_fused_takes_each_part_per_rank() -> None:
    cfg = TINY  # 4 q heads, 2 kv heads, head_dim 8
    hd = cfg.head_dim
    parts = [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]
    w = _model().blocks[0].attn.qkv.weight.detach()
    q, k, v = w.split(parts)
    r1 = shard_fused(w, parts, rank=1, tp=2)
    torch.testing.assert_close(r1, torch.cat([q[2 * hd:], k[hd:], v[hd:]]))
    with pytest.raises(ValueError, match="tp=3"):
        shard_fused(w, parts, rank=0, tp=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_fp32() -> None:
    m = _model()
    x = torch.randint(0, TINY.vocab_size, (2, 32))
    doc = torch.tensor([[0] * 12 + [1] * 20, [0] * 32])
    ref = m(x, doc_ids=doc)
    gpu = _model().cuda().to(torch.bfloat16)
    out = gpu(x.cuda(), doc_ids=doc.cuda()).float().cpu()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    with torch.no_grad():
        cache = gpu.new_kv_cache(2)
        steps = [gpu(x[:, :8].cuda(), kv_cache=cache)] + [gpu(x[:, t : t + 1].cuda(), kv_cache=cache)
                                                          for t in range(8, 32)]
        torch.testing.assert_close(torch.cat(steps, 1).float().cpu(), m(x).detach(), atol=5e-2, rtol=5e-2)
