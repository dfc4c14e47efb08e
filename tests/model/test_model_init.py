"""Initial weights: one draw order for the dense model, its tensor-by-tensor stream, and the shards a
tensor-parallel rank fills from either (kubellm.model.transformer, kubellm.training.topology)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

from kubellm.model import Transformer, get_preset
from kubellm.model import transformer as transformer_module
from kubellm.model.parallel import TensorParallelGroup, TensorParallelLayers, shard_state_dict
from kubellm.model.transformer import dense_init_tensors, init_order
from kubellm.training.topology import fill_from_dense


@pytest.mark.parametrize("tie", [False, True])
def test_the_stream_draws_the_dense_models_weights_and_rng_state(tie: bool) -> None:
    cfg = get_preset("debug").with_(vocab_size=96, tie_embeddings=tie)
    torch.manual_seed(3)
    dense = Transformer(cfg).state_dict()
    after_dense = torch.rand(4)
    torch.manual_seed(3)
    streamed = dict(dense_init_tensors(cfg))
    assert torch.equal(torch.rand(4), after_dense)  # the same draws, so what follows draws the same too
    expect = set(dense) - ({"output.weight"} if tie else set())
    assert set(streamed) == expect == {name for name, _ in init_order(cfg)}
    for k, v in streamed.items():
        assert torch.equal(v, dense[k]), k
    assert torch.equal(dense["norm.weight"], torch.ones(cfg.dim))
    resid = dense["blocks.0.ffn.down.weight"].std() / dense["blocks.0.ffn.gate_up.weight"].std()
    assert float(resid) == pytest.approx((2 * cfg.n_layers) ** -0.5, rel=0.05)  # GPT-2's residual scaling


def test_a_model_built_on_the_meta_device_holds_no_memory_and_draws_nothing() -> None:
    cfg = get_preset("debug")
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    model = Transformer(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert torch.equal(torch.random.get_rng_state(), before)
    with torch.device("meta"):  # a device context is honoured the same way
        assert all(p.is_meta for p in Transformer(cfg).parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_tp_ranks_fill_their_shards_of_the_drawn_or_given_weights(tie: bool) -> None:
    cfg = get_preset("debug").with_(vocab_size=96, tie_embeddings=tie)
    torch.manual_seed(5)
    dense = Transformer(cfg).state_dict()
    for rank in range(2):
        want = shard_state_dict(dense, cfg, rank, 2)
        for given in (None, dense):
            torch.manual_seed(5)
            model = Transformer(cfg, layers=TensorParallelLayers(TensorParallelGroup(rank, 2)), init=False)
            fill_from_dense(model, cfg, rank, 2, given)
            got = model.state_dict()
            assert set(got) == set(want)
            for k in want:
                assert torch.equal(got[k], want[k]), (rank, k, given is None)
            if tie:
                assert model.output.weight is model.tok_embeddings.weight


def test_given_weights_that_do_not_fit_are_named() -> None:
    cfg = get_preset("debug").with_(vocab_size=96)
    full = Transformer(cfg).state_dict()
    model = Transformer(cfg, init=False)
    missing = {k: v for k, v in full.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(KeyError, match=r"lack \['blocks.1.attn.qkv.weight'\]"):
        fill_from_dense(model, cfg, 0, 1, missing)
    with pytest.raises(KeyError, match="'blocks.9.attn.qkv.weight', which the model does not have"):
        fill_from_dense(model, cfg, 0, 1, {**full, "blocks.9.attn.qkv.weight": torch.zeros(1)})
    wrong = {**full, "norm.weight": torch.ones(cfg.dim + 1)}
    with pytest.raises(ValueError, match=rf"'norm.weight' has shape \({cfg.dim + 1},\).*needs \({cfg.dim},\)"):
        fill_from_dense(model, cfg, 0, 1, wrong)


def test_filling_a_shard_keeps_one_dense_tensor_alive_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the stream: a rank never holds the dense model. Each drawn tensor is dead (no
    reference left) before the next is drawn."""
    cfg = get_preset("debug").with_(vocab_size=96)
    real = transformer_module.dense_init_tensors
    alive_at_draw: list[int] = []

    def watched(c: object, device: object = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        refs: list[weakref.ref[torch.Tensor]] = []
        for name, t in real(c, device):  # type: ignore[arg-type]
            gc.collect()
            alive_at_draw.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(t))
            yield name, t
            del t

    monkeypatch.setattr(transformer_module, "dense_init_tensors", watched)
    model = Transformer(cfg, layers=TensorParallelLayers(TensorParallelGroup(0, 2)), init=False)
    fill_from_dense(model, cfg, 0, 2, None)
    assert len(alive_at_draw) == len(init_order(cfg)) and max(alive_at_draw) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_built_for_the_gpu_has_everything_there() -> None:
    cfg = get_preset("debug")
    model = Transformer(cfg, device="cuda")
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])  # the RoPE tables too
    logits = model(torch.randint(0, cfg.vocab_size, (2, 16), device="cuda"))
    assert logits.is_cuda and bool(torch.isfinite(logits).all())


def test_given_weights_are_looked_up_only_for_what_the_module_holds() -> None:
    """A pipeline stage holds some of the model's tensors: a lazy mapping (a safetensors directory, a
    checkpoint's shards) is asked for those alone, and membership is tested without a lookup."""
    from collections.abc import Mapping

    cfg = get_preset("debug").with_(vocab_size=96)
    full = Transformer(cfg).state_dict()
    looked_up: list[str] = []

    class Counting(Mapping[str, torch.Tensor]):
        def __len__(self) -> int:
            return len(full)

        def __iter__(self) -> Iterator[str]:
            return iter(full)

        def __contains__(self, name: object) -> bool:
            return name in full

        def __getitem__(self, name: str) -> torch.Tensor:
            looked_up.append(name)
            return full[name]

    stage = torch.nn.Module()  # a "stage" holding the final norm and block 1's attention output
    stage.norm = torch.nn.Parameter(torch.empty(cfg.dim))
    stage.out = torch.nn.Parameter(torch.empty_like(full["blocks.1.attn.out.weight"]))
    names = {"norm": "norm.weight", "out": "blocks.1.attn.out.weight"}
    fill_from_dense(stage, cfg, 0, 1, Counting(), dense_name=names.__getitem__)
    assert sorted(looked_up) == ["blocks.1.attn.out.weight", "norm.weight"]
    assert torch.equal(stage.norm, full["norm.weight"]) and torch.equal(stage.out, full["blocks.1.attn.out.weight"])
