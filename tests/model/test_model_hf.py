"""HF interop: transformers loads our export with the same logits; import round-trips; bad dirs fail."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from model_tokenizer_util import build_tokenizer
from safetensors.torch import load_file, save_file

from kubellm.core.errors import ConfigError, IntegrityError
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.model.hf import export_hf, hf_to_state_dict, load_hf, state_dict_to_hf

BASE = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64,
                   rope_theta=500.0, norm_eps=1e-6)
VARIANTS = {
    "gqa-untied": BASE,
    "gqa-tied": BASE.with_(tie_embeddings=True),
    "mha-untied": BASE.with_(n_kv_heads=None),
    "mha-tied": BASE.with_(n_kv_heads=None, tie_embeddings=True),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_loads_export_with_same_logits(variant: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = VARIANTS[variant]
    model = _model(cfg)
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_key_value_heads"] == cfg.kv_heads and conf["tie_word_embeddings"] == cfg.tie_embeddings
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (0, [1, 6], 2)  # eos, <|end|>
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 6]  # eos, <|end|>
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) != cfg.tie_embeddings

    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    exported_tok = AutoTokenizer.from_pretrained(str(out))
    assert exported_tok.chat_template and exported_tok.model_max_length == cfg.max_seq_len  # not 1e30
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)

    back, back_cfg = load_hf(out)
    assert back_cfg == cfg
    assert (back.output.weight is back.tok_embeddings.weight) == cfg.tie_embeddings
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_imports_third_party_llama(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    hf_cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=96,
                         rope_theta=20000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path))
    model, cfg = load_hf(tmp_path)
    assert (cfg.dim, cfg.kv_heads, cfg.rope_theta, cfg.max_seq_len) == (48, 3, 20000.0, 96)
    x = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_bf16_export(tmp_path: Path) -> None:
    export_hf(_model(BASE), BASE, tmp_path, dtype=torch.bfloat16)
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_state_dict_mapping_round_trip() -> None:
    sd = {"module." + k: v for k, v in _model(BASE).state_dict().items()}  # as a DDP/DeepSpeed wrapper names it
    hf = state_dict_to_hf(sd, BASE)
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    back = hf_to_state_dict(hf, BASE)
    assert all(torch.equal(back[k.removeprefix("module.")], v) for k, v in sd.items())


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("attention_bias", True),
    ("hidden_act", "gelu"),
    ("model_type", "mistral"),
])
def test_unsupported_features_are_refused(key: str, value: object, tmp_path: Path) -> None:
    export_hf(_model(BASE), BASE, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=rf"config\.json: {key}="):
        load_hf(tmp_path)


@pytest.mark.parametrize("theta", [None, "10000", -5.0])
def test_bad_rope_theta_is_refused_naming_it(theta: object, tmp_path: Path) -> None:
    # rope_theta: null was a bare TypeError from float(None); a negative one loaded (NaN frequencies)
    export_hf(_model(BASE), BASE, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.pop("rope_parameters", None)
    conf["rope_theta"] = theta
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"config\.json: [\s\S]*rope_theta"):
        load_hf(tmp_path)


@pytest.mark.parametrize("scaling", [{"rope_type": "default"}, {"type": "default"}])
def test_default_rope_scaling_is_plain_rope(scaling: dict, tmp_path: Path) -> None:
    # `{"rope_type": "default"}` is how some exports spell "no scaling": it loads (was refused)
    model = _model(BASE)
    export_hf(model, BASE, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["rope_scaling"] = scaling
    (tmp_path / "config.json").write_text(json.dumps(conf))
    loaded, cfg = load_hf(tmp_path)
    assert cfg == BASE
    ids = torch.randint(0, BASE.vocab_size, (1, 9))
    torch.testing.assert_close(loaded(ids), model(ids))


def test_swish_activation_is_silu(tmp_path: Path) -> None:
    # transformers maps hidden_act "swish" to SiLU: the same model, so it loads (was refused)
    model = _model(BASE)
    export_hf(model, BASE, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["hidden_act"] = "swish"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    back, cfg = load_hf(tmp_path)
    assert cfg == BASE
    x = torch.randint(0, BASE.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path: Path) -> None:
    # was loaded with the embedding as the head, while transformers unties and uses lm_head.weight:
    # logits differed from transformers' for the same directory
    export_hf(_model(BASE), BASE, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"config\.json: tie_word_embeddings=true but model\.safetensors holds an "
                                          r"'lm_head\.weight' that differs"):
        load_hf(tmp_path)
    # an lm_head equal to the embedding (some exporters write both) is the tied model
    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors")
    model, cfg = load_hf(tmp_path)
    assert cfg.tie_embeddings and model.output.weight is model.tok_embeddings.weight


def test_missing_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    export_hf(_model(BASE), BASE, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        load_hf(tmp_path)


def test_export_refuses_a_state_dict_that_is_not_the_configs_model(tmp_path: Path) -> None:
    # each of these used to export: transformers then loaded a missing weight randomly initialised
    # (a warning only), and a tied config silently dropped an untied model's output head
    sd = dict(_model(BASE).state_dict())
    partial = {k: v for k, v in sd.items() if k != "blocks.1.ffn.down.weight"}
    with pytest.raises(IntegrityError, match=r"missing 1 tensor\(s\) of the model \(first 'blocks\.1\.ffn\.down"):
        export_hf(partial, BASE, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    with pytest.raises(IntegrityError, match="missing"):
        export_hf({}, BASE, tmp_path / "empty")
    with pytest.raises(IntegrityError, match=r"'blocks\.0\.ffn\.gate_up\.weight' has shape \(96, 32\) but the "
                                             r"model config implies \(80, 32\)"):
        export_hf(sd, BASE.with_(ffn_dim=40), tmp_path / "shape")
    with pytest.raises(IntegrityError, match="differs from 'tok_embeddings.weight' but the config has tie_embeddings"):
        export_hf(sd, BASE.with_(tie_embeddings=True), tmp_path / "tied")
    with pytest.raises(IntegrityError, match=r"has 1 tensor\(s\) the model does not \(first "
                                             r"'_checkpoint_wrapped_module\.norm\.weight'\)"):
        export_hf({**sd, "_checkpoint_wrapped_module.norm.weight": sd["norm.weight"]}, BASE, tmp_path / "extra")
    # a DeepSpeed-wrapped state dict of a tied model, with or without the shared head, still exports
    tied = BASE.with_(tie_embeddings=True)
    tsd = {"module." + k: v for k, v in _model(tied).state_dict().items()}
    export_hf(tsd, tied, tmp_path / "ok1")
    export_hf({k: v for k, v in tsd.items() if k != "module.output.weight"}, tied, tmp_path / "ok2")
    assert load_file(tmp_path / "ok1" / "model.safetensors").keys() == load_file(tmp_path / "ok2" / "model.safetensors").keys()


def test_no_safetensors_is_refused(tmp_path: Path) -> None:
    export_hf(_model(BASE), BASE, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(IntegrityError, match="pickle-based weights are not loaded"):
        load_hf(tmp_path)


def test_tokenizer_larger_than_vocab_is_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    small = BASE.with_(vocab_size=200)
    with pytest.raises(ConfigError, match="tokenizer has 300 tokens but the model's vocab_size is 200"):
        export_hf(_model(small), small, tmp_path, tokenizer_dir=tokenizer_dir)


def test_export_copies_no_weight_file_from_a_model_tokenizer_dir(tmp_path: Path, tokenizer_dir: Path) -> None:
    # SFT/DPO pass the base model's directory as tokenizer_dir: a base saved sharded (transformers'
    # save_pretrained) or with pickle weights had its shards/pytorch_model.bin copied into the new export
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    export_hf(_model(BASE), BASE, tmp_path / "single", tokenizer_dir=tokenizer_dir)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "single")).save_pretrained(str(base), max_shard_size="20KB")
    for f in tokenizer_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.00.pth", "model.pt",
                 "training_args.bin", "_manifest.json"):
        (base / name).write_bytes(b"{}")
    shards = sorted(p.name for p in base.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (base / "model.safetensors.index.json").is_file()
    loaded, cfg = load_hf(base)

    tuned = _model(BASE)
    with torch.no_grad():
        tuned.norm.weight.add_(1.0)  # a different model from the base
    out = export_hf(tuned, cfg, tmp_path / "sft", tokenizer_dir=base)
    tokenizer_files = {p.name for p in tokenizer_dir.iterdir()}
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "generation_config.json"} \
        | tokenizer_files
    back, _ = load_hf(out)
    assert torch.equal(back.norm.weight, tuned.norm.weight)
    assert not torch.equal(back.norm.weight, loaded.norm.weight)


def test_single_file_beside_an_index_of_other_shards_is_refused(tmp_path: Path) -> None:
    # transformers loads model.safetensors first, vLLM (and kubellm, before) the index's shards:
    # the same directory was two different models
    export_hf(_model(BASE), BASE, tmp_path)
    other = _model(BASE).state_dict()
    with torch.no_grad():
        for v in other.values():
            v.add_(0.5)
    tensors = {k: v.contiguous().clone() for k, v in state_dict_to_hf(other, BASE).items()}
    save_file(tensors, tmp_path / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match=r"holds both model\.safetensors and model\.safetensors\.index\.json "
                                             r"\(which maps tensors to \['model-00001-of-00001\.safetensors'\]"):
        load_hf(tmp_path)
    # an index that maps every tensor to model.safetensors itself describes the same model: accepted
    index["weight_map"] = {k: "model.safetensors" for k in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_hf(tmp_path)
    assert torch.equal(model.norm.weight, _model(BASE).norm.weight)


def test_unreadable_config_json_is_an_integrity_error(tmp_path: Path) -> None:
    export_hf(_model(BASE), BASE, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(IntegrityError, match=r"config\.json: not valid JSON"):
        load_hf(tmp_path)


@pytest.mark.parametrize("where", ["../elsewhere/model-00001.safetensors", "/abs/model-00001.safetensors"])
def test_an_index_pointing_outside_the_model_directory_is_refused(tmp_path: Path, where: str) -> None:
    """A shard outside the directory is not among the artifact's sha256-verified files."""
    d = tmp_path / "m"
    export_hf(_model(BASE), BASE, d)
    names = list(state_dict_to_hf(_model(BASE).state_dict(), BASE))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: where for n in names}}))
    with pytest.raises(IntegrityError, match=r"weight_map\[.*\] = .* points outside the model directory"):
        load_hf(d)


def test_import_errors_name_the_config_json_keys(tmp_path: Path) -> None:
    """pydantic names kubellm's fields (`ffn_dim`, `norm_eps`, `n_kv_heads`); the user edits config.json."""
    export_hf(_model(BASE), BASE, tmp_path / "m")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value, said in (("intermediate_size", 0, "intermediate_size"), ("rms_norm_eps", None, "rms_norm_eps"),
                             ("num_key_value_heads", 3, "num_key_value_heads=3 must divide num_attention_heads=4"),
                             ("num_key_value_heads", 0, "num_key_value_heads")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**conf, key: value}))
        with pytest.raises(ConfigError) as e:
            load_hf(tmp_path / "m")
        assert said in str(e.value) and "ffn_dim" not in str(e.value) and "n_kv_heads" not in str(e.value), str(e.value)


@pytest.mark.parametrize("variant", ["gqa-untied", "gqa-tied"])
def test_open_hf_checks_from_the_headers_and_reads_one_tensor_at_a_time(variant: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SFT/DPO workers fill their model (or TP shard) from `open_hf`'s weights: nothing is read until a
    tensor is asked for, and while the model is filled each tensor is freed before the next is read."""
    import gc
    import weakref

    from kubellm.model import hf as hf_module
    from kubellm.training.topology import fill_from_dense

    cfg = VARIANTS[variant]
    model = _model(cfg)
    export_hf(model, cfg, tmp_path / "hf")
    real = hf_module._read_tensors
    refs: list[weakref.ref[torch.Tensor]] = []
    alive_at_read: list[int] = []  # per opening of a file: tensors read earlier and still alive

    def watched(path: Path, names: list[str]) -> Iterator[torch.Tensor]:
        gc.collect()
        alive_at_read.append(sum(r() is not None for r in refs))
        for t in real(path, names):
            refs.append(weakref.ref(t))
            yield t

    monkeypatch.setattr(hf_module, "_read_tensors", watched)
    weights, got_cfg = hf_module.open_hf(tmp_path / "hf")
    assert got_cfg == cfg and alive_at_read == []  # names and shapes from the headers alone
    filled = Transformer(cfg, init=False)
    fill_from_dense(filled, cfg, 0, 1, weights)
    # one opening of the file per tensor of ours (a fused qkv / gate_up reads its 3 / 2 parts in it), and
    # every tensor read before it was freed by then
    assert len(alive_at_read) == len(weights) and max(alive_at_read) == 0, alive_at_read
    assert len(refs) == len(hf_module.hf_tensor_names(cfg))
    for k, v in model.state_dict().items():
        assert torch.equal(filled.state_dict()[k], v), k
    assert set(weights) == set(model.state_dict()) - ({"output.weight"} if cfg.tie_embeddings else set())


def test_open_hf_names_the_file_and_tensor_of_a_wrong_shape_before_reading_anything(tmp_path: Path) -> None:
    cfg = BASE
    export_hf(_model(cfg), cfg, tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, cfg.dim + 1)
    save_file(sd, tmp_path / "hf" / "model.safetensors")
    from kubellm.model.hf import open_hf

    with pytest.raises(IntegrityError, match=r"model.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight' has "
                                             rf"shape \(16, {cfg.dim + 1}\), config.json implies \(16, {cfg.dim}\)"):
        open_hf(tmp_path / "hf")


def test_a_tied_head_stored_in_another_dtype_with_the_same_values_is_accepted(tmp_path: Path) -> None:
    from kubellm.model.hf import open_hf

    cfg = BASE.with_(tie_embeddings=True)
    export_hf(_model(cfg), cfg, tmp_path / "hf", dtype=torch.bfloat16)
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].float()}, tmp_path / "hf" / "model.safetensors")
    weights, _ = open_hf(tmp_path / "hf")
    assert "output.weight" not in weights
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].float()
    sd["lm_head.weight"][3, 5] += 1.0
    save_file(sd, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ConfigError, match="'lm_head.weight' that differs from 'model.embed_tokens.weight'"):
        open_hf(tmp_path / "hf")


@pytest.mark.parametrize("variant", ["gqa-untied", "gqa-tied"])
def test_a_model_over_the_shard_size_is_exported_as_indexed_shards(variant: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard is at most `max_shard_bytes` (a bigger tensor alone), and the copies of one shard are
    freed by the time the next is written: the export never holds a second copy of the whole model."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    from kubellm.model import hf as hf_module

    cfg = VARIANTS[variant]
    model = _model(cfg)
    limit = 3 * cfg.dim * cfg.ffn_dim * 4  # fp32 bytes of three FFN matrices
    written: list[tuple[str, int, int]] = []  # (file, bytes, tensors of earlier shards still alive)
    refs: list[weakref.ref[torch.Tensor]] = []
    real_save = hf_module.save_file

    def watched(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
        gc.collect()
        written.append((Path(path).name, sum(t.numel() * t.element_size() for t in tensors.values()),
                        sum(r() is not None for r in refs)))
        refs.extend(weakref.ref(t) for t in tensors.values())
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_module, "save_file", watched)
    out = export_hf(model, cfg, tmp_path / "hf", max_shard_bytes=limit)
    n = len(written)
    assert n > 2 and [w[0] for w in written] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    largest = max(t.numel() * 4 for t in model.state_dict().values())
    assert all(b <= max(limit, largest) for _, b, _ in written) and all(alive == 0 for *_, alive in written), written
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_module.hf_tensor_names(cfg))
    assert set(index["weight_map"].values()) == {w[0] for w in written}
    assert index["metadata"]["total_size"] == sum(b for _, b, _ in written)

    x = torch.randint(0, cfg.vocab_size, (2, 24))
    back, _ = load_hf(out)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(out)).eval()(x).logits, model(x),
                                   atol=1e-4, rtol=0)
    # exported again into the same directory, under the shard size: one file, the old shards gone
    # (left beside it, the directory would hold two models and be refused)
    export_hf(model, cfg, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    back, _ = load_hf(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
