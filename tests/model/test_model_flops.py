"""Parameter count and FLOPs/token from the config agree with the module's own parameters."""

from __future__ import annotations

import pytest
import torch

from kubellm.model import Transformer
from kubellm.model.config import ModelConfig, get_preset
from kubellm.model.flops import flops_per_token, num_params


def _count(model: Transformer, skip_embeddings: bool = False) -> int:
    seen: dict[int, int] = {}
    for name, p in model.named_parameters():  # named_parameters() already de-duplicates tied weights
        if skip_embeddings and name.startswith(("tok_embeddings.", "output.")):
            continue
        seen[id(p)] = p.numel()
    return sum(seen.values())


@pytest.mark.parametrize("name", ["debug", "seed", "125m", "350m", "1b", "7b"])
def test_num_params_matches_module(name: str) -> None:
    cfg = get_preset(name)
    with torch.device("meta"):  # no memory for the 7B: shapes only
        model = Transformer(cfg)
    assert num_params(cfg) == _count(model)
    assert num_params(cfg, include_embeddings=False) == _count(model, skip_embeddings=True)


def test_tied_and_gqa_variants() -> None:
    base = ModelConfig(vocab_size=300, dim=64, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=96)
    for cfg in (base, base.with_(tie_embeddings=True), base.with_(n_kv_heads=None)):
        with torch.device("meta"):
            assert num_params(cfg) == _count(Transformer(cfg))
    tied, untied = base.with_(tie_embeddings=True), base
    assert num_params(untied) - num_params(tied) == 300 * 64
    # GQA: 8 q heads of 8, kv 2 heads → qkv = 64*(8+4)*8 rows·cols per layer
    assert num_params(base.with_(n_kv_heads=None)) - num_params(base) == 3 * 64 * (2 * 6 * 8)


def test_flops_per_token_formula() -> None:
    cfg = get_preset("seed")
    n_matmul = num_params(cfg, include_embeddings=False) + cfg.vocab_size * cfg.dim
    assert flops_per_token(cfg, 256) == 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * 256
    # Tying does not change the compute: the head matmul happens either way.
    assert flops_per_token(cfg.with_(tie_embeddings=True), 256) == flops_per_token(cfg, 256)
    # Llama-2-7B has 6.74e9 parameters.
    assert num_params(get_preset("7b")) == 6_738_415_616


@pytest.mark.parametrize("name", ["debug", "seed", "350m"])
@pytest.mark.parametrize("tied", [False, True])
def test_layer_forward_flops_add_up_to_flops_per_token(name: str, tied: bool) -> None:
    from kubellm.model.flops import layer_forward_flops

    cfg = get_preset(name).with_(tie_embeddings=tied)
    emb, block, norm, head = layer_forward_flops(cfg, 512)
    assert 3 * (emb + cfg.n_layers * block + norm + head) == flops_per_token(cfg, 512)
    assert emb == 0 and head == 2 * cfg.vocab_size * cfg.dim  # a lookup; the head's matmul
    # 350m: the 32k-vocabulary head costs ~2.4 blocks, though the embedding holds as many parameters
    if name == "350m":
        assert 2.3 < head / block < 2.6
