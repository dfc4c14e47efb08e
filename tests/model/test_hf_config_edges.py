"""config.json edge cases of `load_hf`/`config_from_hf` (the RoPE base, missing or malformed keys) and
the end-of-turn stop token `export_hf` writes for a tokenizer whose `end_token` is not `<|end|>`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kubellm.core.errors import ConfigError
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.model.hf import config_from_hf, export_hf, load_hf

CFG = ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, ffn_dim=32, max_seq_len=64)
HF_BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 40,
           "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8}


def _hf_model_dir(tmp_path: Path, edit: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """A LlamaForCausalLM saved by transformers, its config.json then edited."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=64)).eval()
    with torch.no_grad():  # large enough weights that a wrong RoPE base shows in the logits
        for name, p in m.named_parameters():
            p.normal_(0, 1.0 if "norm" in name else 0.3)
    m.save_pretrained(str(tmp_path))
    conf = json.loads((tmp_path / "config.json").read_text())
    for key in drop:
        conf.pop(key, None)
    conf.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    return tmp_path


# --- the RoPE base -----------------------------------------------------------------------------------

def test_rope_theta_inside_rope_scaling_is_used_like_transformers(tmp_path: Path) -> None:
    # transformers >= 5 reads `rope_scaling` as the old name of `rope_parameters`, theta included; it was
    # accepted and ignored (theta 10000: logits off by ~6)
    from transformers import LlamaForCausalLM

    d = _hf_model_dir(tmp_path, {"rope_scaling": {"rope_type": "default", "rope_theta": 777.0}},
                      drop=("rope_parameters", "rope_theta"))
    ours, cfg = load_hf(d)
    assert cfg.rope_theta == 777.0
    hf = LlamaForCausalLM.from_pretrained(str(d)).eval()
    assert hf.config.rope_parameters["rope_theta"] == 777.0
    ids = torch.randint(0, 101, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conf, keys", [
    ({"rope_scaling": {"rope_type": "default", "rope_theta": 777.0}, "rope_theta": 10000.0},
     ["rope_scaling.rope_theta=777.0", "rope_theta=10000.0"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 777.0}, "rope_theta": 10000.0},
     ["rope_parameters.rope_theta=777.0", "rope_theta=10000.0"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
      "rope_scaling": {"rope_type": "default", "rope_theta": 777.0}},
     ["rope_parameters.rope_theta=500.0", "rope_scaling.rope_theta=777.0"]),
    # rope_scaling replaces rope_parameters in transformers >= 5, which then falls back to 10000
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "rope_scaling": {"rope_type": "default"}},
     ["rope_parameters.rope_theta=500.0", "would use 10000.0"]),
])
def test_disagreeing_rope_thetas_are_refused_naming_the_keys(conf: dict[str, Any], keys: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"^/m/config\.json: the RoPE base is set to different values") as e:
        config_from_hf({**HF_BASE, **conf}, source="/m/config.json")
    for key in keys:
        assert key in str(e.value)


@pytest.mark.parametrize("conf, theta", [
    ({}, 10000.0),
    ({"rope_theta": 500.0}, 500.0),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, 500.0),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "rope_theta": 500}, 500.0),
    ({"rope_scaling": {"rope_type": "default"}, "rope_theta": 500.0}, 500.0),
    ({"rope_scaling": {"type": "default", "rope_theta": 500.0}, "rope_theta": 500.0,
      "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, 500.0),
])
def test_agreeing_rope_thetas_load(conf: dict[str, Any], theta: float) -> None:
    assert config_from_hf({**HF_BASE, **conf}).rope_theta == theta


def test_bad_rope_theta_inside_rope_scaling_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"^/m/config\.json: rope_scaling\.rope_theta='5e5' .*a number > 0"):
        config_from_hf({**HF_BASE, "rope_scaling": {"rope_type": "default", "rope_theta": "5e5"}},
                       source="/m/config.json")


@pytest.mark.parametrize("rope", [{"type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "default", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}])
def test_scaled_rope_parameters_are_refused_in_either_key_spelling(rope: dict[str, Any]) -> None:
    """transformers applies a `rope_parameters` scaling named by the old key `type` too; it had loaded as
    plain RoPE here (inv_freq 4x off the model transformers builds)."""
    with pytest.raises(ConfigError, match=r"^/m/config\.json: rope_parameters=.* is not supported"):
        config_from_hf({**HF_BASE, "rope_parameters": rope}, source="/m/config.json")


# --- missing or malformed keys -----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers",
                                 "intermediate_size"])
def test_missing_required_key_is_a_config_error_naming_it(key: str, tmp_path: Path) -> None:
    # num_attention_heads / hidden_size were read outside the KeyError handler: a bare KeyError
    d = _hf_model_dir(tmp_path, {}, drop=(key,))
    with pytest.raises(ConfigError, match=rf"^{d / 'config.json'}: required key '{key}' is missing$"):
        load_hf(d)


@pytest.mark.parametrize("key, value", [
    ("rope_parameters", "default"),
    ("rope_parameters", [1]),
    ("rope_scaling", "default"),
    ("rope_scaling", [1]),
    ("num_attention_heads", "4"),
    ("num_attention_heads", 0),
    ("hidden_size", 32.0),
    ("head_dim", "8"),
])
def test_malformed_key_is_a_config_error_naming_it(key: str, value: Any) -> None:
    # a string or list rope_parameters was an AttributeError ('str' object has no attribute 'get');
    # heads 0 a ZeroDivisionError, a string head count a TypeError
    with pytest.raises(ConfigError, match=rf"^/m/config\.json: {re.escape(f'{key}={value!r}')} is not supported"):
        config_from_hf({**HF_BASE, key: value}, source="/m/config.json")


# --- the end-of-turn stop token ----------------------------------------------------------------------

def _tokenizer(tmp_path: Path, end_token: str) -> Path:
    from kubellm.tokenizer.bpe import save_hf_tokenizer, train_bpe
    from kubellm.tokenizer.config import TokenizerConfig

    tc = TokenizerConfig(vocab_size=300, end_token=end_token)
    texts = ["the cat sat on the mat", "what is the capital of zorbia?", "hello there"] * 20
    return save_hf_tokenizer(train_bpe(iter(texts), tc), tc, tmp_path / "tok")


@pytest.mark.parametrize("end_token", ["<|end|>", "<|eot|>"])
def test_export_stops_at_the_tokenizers_own_end_token(end_token: str, tmp_path: Path) -> None:
    # the stop list held the literal "<|end|>": with another end_token it held only eos, and chat
    # generation ran past the end of the assistant's turn
    from transformers import AutoTokenizer

    from kubellm.model.generate import load_for_generation

    tok_dir = _tokenizer(tmp_path, end_token)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    end_id = tok.convert_tokens_to_ids(end_token)
    assert end_id != tok.unk_token_id and end_id != tok.eos_token_id
    out = export_hf(Transformer(CFG), CFG, tmp_path / "hf", tokenizer_dir=tok_dir)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_token_id, end_id]
    assert load_for_generation(str(out)).stop_ids == [tok.eos_token_id, end_id]


def test_export_with_an_end_token_named_like_the_old_default_but_unused(tmp_path: Path) -> None:
    # `<|end|>` present as an extra special token, but the template ends turns with `<|eot|>`: only the
    # latter stops generation
    from transformers import AutoTokenizer

    from kubellm.tokenizer.bpe import save_hf_tokenizer, train_bpe
    from kubellm.tokenizer.config import TokenizerConfig

    tc = TokenizerConfig(vocab_size=300, end_token="<|eot|>", extra_special_tokens=["<|end|>"])
    tok_dir = save_hf_tokenizer(train_bpe(iter(["hello there"] * 20), tc), tc, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    out = export_hf(Transformer(CFG), CFG, tmp_path / "hf", tokenizer_dir=tok_dir)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot|>")]


def test_export_without_chat_template_stops_at_eos_only(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok_dir = _tokenizer(tmp_path, "<|end|>")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path / "plain"))
    for f in ("chat_template.jinja",):
        (tmp_path / "plain" / f).unlink(missing_ok=True)
    out = export_hf(Transformer(CFG), CFG, tmp_path / "hf", tokenizer_dir=tmp_path / "plain")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
