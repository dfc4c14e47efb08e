"""Tensor-parallel layers: sharding round trips, and 2-rank forward/backward equal to the dense model.

The 2-rank test compares logits and every gradient (gathered back to dense shapes) with one
process at 1e-5 (fp32; only the order of the all-reduce sums differs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kubellm.core.errors import ConfigError
from kubellm.model import Transformer
from kubellm.model.parallel import shard_state_dict, unshard_tensor
from kubellm.training.config import ParallelConfig, TrainConfig
from kubellm.training.spawn import spawn
from kubellm.training.topology import validate_layout
from tests.parallel.parallel_helpers import tiny_model


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_shard_then_unshard_is_identity(tp: int, tie: bool) -> None:
    cfg = tiny_model(tie_embeddings=tie)
    torch.manual_seed(0)
    full = Transformer(cfg).state_dict()
    shards = [shard_state_dict(full, cfg, r, tp) for r in range(tp)]
    for name, t in full.items():
        back = unshard_tensor(name, [s[name] for s in shards], cfg)
        torch.testing.assert_close(back, t, rtol=0, atol=0)
    if tp == 2:
        # rank 0's qkv shard holds q of heads 0-1, k of KV head 0, v of KV head 0 (not the first rows)
        hd = cfg.head_dim
        qkv = full["blocks.0.attn.qkv.weight"]
        q, k, v = qkv.split([cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd])
        expect = torch.cat([q[: 2 * hd], k[:hd], v[:hd]])
        torch.testing.assert_close(shards[0]["blocks.0.attn.qkv.weight"], expect, rtol=0, atol=0)


def _tp_forward_backward(tie: bool, doc_masking: bool) -> dict[str, Any]:
    import torch.distributed as dist

    from kubellm.model.loss import causal_lm_loss
    from kubellm.model.parallel import TensorParallelGroup, TensorParallelLayers, gather_state_dict

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_model(tie_embeddings=tie)
    torch.manual_seed(0)
    dense = Transformer(cfg)
    tp = TensorParallelGroup(rank=rank, size=world, group=dist.new_group(list(range(world))))
    model = Transformer(cfg, layers=TensorParallelLayers(tp))
    model.load_state_dict(shard_state_dict(dense.state_dict(), cfg, rank, world))
    for p in model.parameters():  # every split weight is marked for DeepSpeed's grad norm / ZeRO
        assert getattr(p, "tensor_model_parallel", False) == (p.ndim == 2), p.shape
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    doc = torch.tensor([[0] * 7 + [1] * 9, [0] * 16]) if doc_masking else None
    out: dict[str, Any] = {}
    for name, m in [("dense", dense), ("tp", model)]:
        logits = m(ids, doc_ids=doc)
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        out[name + "_logits"] = logits.detach()
    grads = {k: p.grad for k, p in model.named_parameters()}
    out["tp_grads"] = gather_state_dict(grads, cfg, tp)
    first = gather_state_dict(grads, cfg, tp, only_first=True)  # the export's form: TP rank 0 alone
    if rank == 0:
        assert first.keys() == out["tp_grads"].keys()
        for k, g in first.items():
            torch.testing.assert_close(g, out["tp_grads"][k], rtol=0, atol=0, msg=k)
    else:
        assert first == {}
    out["dense_grads"] = {k: p.grad for k, p in dense.named_parameters()}
    # compare here and return small numbers: the spawn harness joins before it reads the result pipe,
    # so a large result would block the child
    torch.testing.assert_close(out["tp_logits"], out["dense_logits"], rtol=1e-5, atol=1e-5)
    assert out["tp_grads"].keys() == out["dense_grads"].keys()
    for k, g in out["dense_grads"].items():
        torch.testing.assert_close(out["tp_grads"][k], g, rtol=1e-4, atol=1e-7, msg=k)
    return {"grad_norm": float(torch.stack([g.norm() for g in out["tp_grads"].values()]).norm()),
            "n_grads": len(out["tp_grads"])}


@pytest.mark.integration
@pytest.mark.parametrize("tie,doc_masking", [(False, False), (True, True)])
def test_tp2_forward_backward_matches_dense(tie: bool, doc_masking: bool) -> None:
    r0, r1 = spawn(_tp_forward_backward, 2, tie, doc_masking)
    assert r0 == r1  # both ranks gathered the same (dense-equal) gradients
    assert r0["grad_norm"] > 0


def test_layout_refusals_name_the_numbers() -> None:
    cfg = tiny_model()  # 4 heads, 2 KV heads, 4 layers
    tc = TrainConfig(micro_batch_size=2, global_batch_size=8)
    with pytest.raises(ConfigError, match=r"dp=1 × tp=2 × pp=1 = 2 but the job has 4"):
        validate_layout(cfg, tc, ParallelConfig(dp=1, tp=2), 4)
    with pytest.raises(ConfigError, match=r"tp=4 does not divide the model's n_kv_heads=2"):
        validate_layout(cfg, tc, ParallelConfig(tp=4), 4)
    with pytest.raises(ConfigError, match=r"pp=8 is larger than the model's n_layers=4"):
        validate_layout(cfg, tc, ParallelConfig(pp=8), 8)
    with pytest.raises(ConfigError, match=r"zero_stage=2 with parallel.pp=2.*use train.zero_stage=1"):
        validate_layout(cfg, tc.model_copy(update={"zero_stage": 2}), ParallelConfig(pp=2), 2)
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not divisible by .*micro_batch_size=3"):
        validate_layout(cfg, tc.model_copy(update={"micro_batch_size": 3}), ParallelConfig(tp=2), 2)
    assert validate_layout(cfg, tc, ParallelConfig(tp=2, pp=2), 8).dp == 2  # dp left unset: world / (tp×pp)


def test_pipeline_refuses_dpo_with_a_reason() -> None:
    from kubellm.training.pipeline import check_objective

    class DPOLike:
        pass

    with pytest.raises(ConfigError, match=r"parallel.pp > 1 is not supported for DPOLike.*parallel.pp=1"):
        check_objective(DPOLike())


def test_pipeline_names_map_to_the_dense_model() -> None:
    from kubellm.training.pipeline import to_dense_name

    assert to_dense_name("0.tok_embeddings.weight", 4) == "tok_embeddings.weight"
    assert to_dense_name("tied_modules.embed.tok_embeddings.weight", 4) == "tok_embeddings.weight"
    assert to_dense_name("3.attn.qkv.weight", 4) == "blocks.2.attn.qkv.weight"
    assert to_dense_name("5.weight", 4) == "norm.weight"
    assert to_dense_name("6.output.weight", 4) == "output.weight"


def test_host_values_are_collected_on_the_device_the_backend_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """An NCCL group has no CPU backend: the engine's loss/token/grad-norm collectives and the TP export
    gather move host tensors to the current CUDA device first (they had been host tensors, which NCCL
    refuses); gloo keeps them on the host."""
    import torch.distributed as dist

    from kubellm.model.parallel import collective_device

    assert collective_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)
