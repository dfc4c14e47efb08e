"""Hugging Face interop: our Transformer <-> a `LlamaForCausalLM` directory (safetensors).

    from kubellm.model.hf import export_hf, load_hf
    export_hf(model, cfg, "out/hf", tokenizer_dir="out/tokenizer")     # transformers/lm-eval/vLLM load it
    model, cfg = load_hf("out/hf")                                     # ours or any compatible Llama

    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('out/hf')"

Weight layout. Our RoPE already uses HF's half-split (`rotate_half`) convention, so q/k weights are
copied as they are — **no permutation** on export or import. (Meta's original checkpoints use the
interleaved convention; HF's conversion script permutes them once, and HF-format directories are what
we read and write.) Our fused weights are split/concatenated by rows:
`attn.qkv = [q_proj | k_proj | v_proj]`, `ffn.gate_up = [gate_proj | up_proj]`.

Only safetensors are read or written (never pickle). Features our model does not implement
(rope scaling, attention/MLP bias, non-SiLU activations, other head_dim) are refused with the
config key named, rather than silently producing a different model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kubellm.core.errors import ConfigError, IntegrityError
from kubellm.model.config import ModelConfig
from kubellm.model.transformer import Transformer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9
"""The largest safetensors file `export_hf` writes: a bigger model is written as numbered shards
(`model-00001-of-0000N.safetensors`) with an index, one shard converted in memory at a time."""
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Files of a model directory that are not the tokenizer's (never copied from tokenizer_dir, which for
# SFT/DPO is the base model's own directory): its configs and manifest, and every weight file or weight
# index in any format (single or sharded safetensors, pickle, TF/Flax, GGUF, ONNX, ...). Copying them
# would put the base's stale weights — or a pickle — beside the new model.safetensors.
_MODEL_FILES = {"config.json", "generation_config.json", "_manifest.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".ggml",
                    ".onnx", ".pkl", ".pickle", ".npz", ".npy", ".index.json")


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a model directory may be copied as part of its tokenizer (not a config,
    manifest, weight file or weight index)."""
    return name not in _MODEL_FILES and not name.lower().endswith(_WEIGHT_SUFFIXES)

# Reply rendered through the tokenizer's chat template to find the token that ends a turn
# (`end_of_turn_id`): plain letters, so no template trims or escapes it.
_PROBE_REPLY = "kubellmEndOfTurnProbe"

_PER_LAYER = {  # our suffix -> HF suffix, for unfused tensors
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.out.weight": "self_attn.o_proj.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
}
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")  # old exports saved this buffer; we recompute it
_ROWS = 8192  # rows of the embedding compared at a time with a tied model's stored lm_head


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP/DeepSpeed `module.`, torch.compile `_orig_mod.`)."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    hd = cfg.head_dim
    return [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]


def state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names/layout -> `LlamaForCausalLM`'s. A tied output head is not written."""
    sd = _strip(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif key == "output.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
        elif key == "norm.weight":
            out["model.norm.weight"] = t
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            i, rest = m.groups()
            pre = f"model.layers.{i}."
            if rest == "attn.qkv.weight":
                q, k, v = t.split(_qkv_sizes(cfg), dim=0)
                out[pre + "self_attn.q_proj.weight"] = q
                out[pre + "self_attn.k_proj.weight"] = k
                out[pre + "self_attn.v_proj.weight"] = v
            elif rest == "ffn.gate_up.weight":
                gate, up = t.split([cfg.ffn_dim, cfg.ffn_dim], dim=0)
                out[pre + "mlp.gate_proj.weight"] = gate
                out[pre + "mlp.up_proj.weight"] = up
            elif rest in _PER_LAYER:
                out[pre + _PER_LAYER[rest]] = t
            else:
                raise KeyError(f"state dict key {key!r} has no LlamaForCausalLM counterpart")
        else:
            raise KeyError(f"state dict key {key!r} has no LlamaForCausalLM counterpart")
    return out


def check_exportable(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Refuse (`IntegrityError`, naming the tensor) a state dict that is not exactly `cfg`'s model: a
    missing tensor (transformers would load the export with that weight randomly initialised, with
    only a warning), a shape `cfg` does not imply, or an output head that differs from the embedding
    under `tie_embeddings` (the export would drop it)."""
    sd = _strip(state_dict)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight")
    extra = [k for k in sd if k not in expected and not (cfg.tie_embeddings and k == "output.weight")]
    if extra:
        raise IntegrityError(f"state dict to export has {len(extra)} tensor(s) the model does not (first "
                             f"{extra[0]!r}): a wrapper's prefix left on the names, or weights of another model")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise IntegrityError(f"state dict to export is missing {len(missing)} tensor(s) of the model "
                             f"(first {missing[0]!r}); an exported directory needs every weight")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise IntegrityError(f"state dict tensor {k!r} has shape {tuple(sd[k].shape)} but the model "
                                 f"config implies {shape} (export with the config the weights were trained with)")
    if cfg.tie_embeddings and "output.weight" in sd:
        out, emb = sd["output.weight"], sd["tok_embeddings.weight"]
        if out is not emb and (out.shape != emb.shape or not torch.equal(out.detach().cpu(), emb.detach().cpu())):
            raise IntegrityError("state dict's 'output.weight' differs from 'tok_embeddings.weight' but the "
                                 "config has tie_embeddings=True; the export would drop the output head")


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every tensor a `LlamaForCausalLM` with this shape must contain."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        names += [pre + s for s in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                    "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")]
        names += [pre + s for s in _PER_LAYER.values()]
    return names


def hf_to_state_dict(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "state dict"
                     ) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` tensors -> our names/layout. A missing tensor raises `IntegrityError` naming
    `source` and the tensor; a tied model gets `output.weight` = the embedding."""
    missing = [n for n in hf_tensor_names(cfg) if n not in hf]
    if missing:
        raise IntegrityError(f"{source}: missing tensor {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    sd = {ours: _fuse([hf[p] for p in parts]) for ours, parts in _our_parts(cfg).items()}
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def hf_config_dict(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                   pad_token_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM`. `rope_theta` is written both inside `rope_parameters`
    (transformers >= 5) and at the top level (older transformers, vLLM)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


_DEFAULT_ROPE_THETA = 10000.0  # transformers' Llama default when no config key sets it


def _rope_theta(d: Mapping[str, Any], rope: Mapping[str, Any], scaling: Mapping[str, Any], source: str,
                refuse: Callable[[str, Any, str], ConfigError]) -> float:
    """The RoPE base a config.json gives, read from `rope_parameters` (transformers >= 5),
    `rope_scaling` (its old name, which transformers >= 5 reads instead of `rope_parameters` when set)
    and the top-level `rope_theta` (older transformers, vLLM). Every one that is set must be a number
    > 0, and they must agree: readers differ on which one wins, so a config whose values disagree
    would be a different model in each of them and is refused naming the keys."""
    found: dict[str, Any] = {}
    for key, block in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if "rope_theta" in block:
            found[f"{key}.rope_theta"] = block["rope_theta"]
    if "rope_theta" in d:
        found["rope_theta"] = d["rope_theta"]
    for key, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise refuse(key, value, "a number > 0")
    # what transformers >= 5 uses: rope_scaling, when set, replaces rope_parameters; the top-level
    # key only fills in a theta that dict lacks
    hf5 = (scaling or rope).get("rope_theta", d.get("rope_theta", _DEFAULT_ROPE_THETA))
    values = {float(v) for v in found.values()} | {float(hf5)}
    if len(values) > 1:
        listed = ", ".join(f"{k}={v!r}" for k, v in found.items())
        raise ConfigError(f"{source}: the RoPE base is set to different values ({listed}); transformers >= 5 "
                          f"would use {float(hf5)!r}, other readers another value — set them all to the "
                          "value the model was trained with")
    return values.pop()


def _plain_rope(block: Mapping[str, Any], unnamed: str | None) -> bool:
    """Whether a `rope_scaling`/`rope_parameters` block asks for plain RoPE: its type (transformers
    reads `rope_type`, or the old key `type`; `unnamed` when neither is set) is "default" and it holds
    nothing but the type and `rope_theta` (a `factor` or other key means a scaling transformers applies)."""
    return (block.get("rope_type", block.get("type", unnamed)) == "default"
            and set(block) <= {"rope_type", "type", "rope_theta"})


def config_from_hf(d: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Llama config.json; refuses what our model cannot reproduce, naming the key."""

    def refuse(key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={value!r} is not supported by kubellm's Transformer "
                           f"(expected {expected})")

    def required(key: str) -> Any:
        if key not in d:
            raise ConfigError(f"{source}: required key {key!r} is missing")
        return d[key]

    def positive_int(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise refuse(key, value, "a positive integer")
        return value

    model_type = d.get("model_type")
    if model_type != "llama":
        raise refuse("model_type", model_type, "'llama'")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN maps both to SiLU
        raise refuse("hidden_act", act, "'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise refuse(key, d[key], "false")
    scaling = d.get("rope_scaling")
    if scaling and not (isinstance(scaling, dict) and _plain_rope(scaling, None)):
        raise refuse("rope_scaling", scaling, "null or {'rope_type': 'default'} (plain RoPE)")
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise refuse("rope_parameters", rope, "null or an object like {'rope_type': 'default', 'rope_theta': 10000.0}")
    if not _plain_rope(rope, "default"):
        raise refuse("rope_parameters", rope, "{'rope_type': 'default', 'rope_theta': ...} (plain RoPE)")
    heads = positive_int("num_attention_heads", required("num_attention_heads"))
    hidden = positive_int("hidden_size", required("hidden_size"))
    head_dim = d.get("head_dim")
    if head_dim is not None and (positive_int("head_dim", head_dim) * heads != hidden):
        raise refuse("head_dim", head_dim, f"hidden_size/num_attention_heads = {hidden // heads}")
    theta = _rope_theta(d, rope, scaling or {}, source, refuse)
    kv = d.get("num_key_value_heads")
    kv = heads if kv is None else positive_int("num_key_value_heads", kv)  # 0 is no default: transformers refuses it
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], dim=hidden, n_layers=d["num_hidden_layers"], n_heads=heads,
            n_kv_heads=None if kv == heads else kv, ffn_dim=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048), rope_theta=theta,
            norm_eps=d.get("rms_norm_eps", 1e-6), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            init_std=d.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None
    except ValueError as e:  # pydantic names kubellm's fields: say the config.json keys they came from
        raise ConfigError(f"{source}: {_HF_KEY.sub(lambda m: _HF_KEYS[m.group(0)], str(e))}") from None


_HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size",
            "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps", "init_std": "initializer_range",
            "tie_embeddings": "tie_word_embeddings"}
_HF_KEY = re.compile(r"\b(?:" + "|".join(sorted(_HF_KEYS, key=len, reverse=True)) + r")\b")


def _tokenizer_ids(tokenizer_dir: Path) -> tuple[dict[str, int | None], list[int], int]:
    from transformers import AutoTokenizer  # heavy import; only when a tokenizer is attached

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    stops = [int(i) for i in (tok.eos_token_id, end_of_turn_id(tok, str(tokenizer_dir))) if isinstance(i, int)]
    return ids, list(dict.fromkeys(stops)), len(tok)


def end_of_turn_id(tok: Any, where: str = "tokenizer") -> int | None:
    """The id of the token the tokenizer's chat template closes an assistant turn with (the tokenizer
    stage's `end_token`, `<|end|>` by default; `<|im_end|>`, `<|eot_id|>` in other families): the first
    special token after the reply in a rendered user/assistant exchange. None when the tokenizer has
    no chat template, or its template puts no special token after a reply or refuses the exchange
    (logged)."""
    if not getattr(tok, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = tok.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # a template may refuse any exchange it was not written for (raise_exception)
        log.warning("%s: the chat template cannot render a user/assistant exchange (%s); the generation "
                    "config will stop at eos only", where, e)
        return None
    at = text.rfind(_PROBE_REPLY) if isinstance(text, str) else -1
    if at < 0:
        log.warning("%s: the chat template does not show the assistant's reply; the generation config "
                    "will stop at eos only", where)
        return None
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    tail = tok(text[at + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]
    return next((int(i) for i in tail if i in special), None)


Gather = Callable[[Collection[str]], "Mapping[str, torch.Tensor] | None"]
"""Collective source of an export (`TrainResult.gather`): the entries of the given state-dict names on
the rank that writes (None on the others)."""


def export_hf(source: torch.nn.Module | Mapping[str, torch.Tensor] | Gather, cfg: ModelConfig,
              out_dir: str | Path | None, tokenizer_dir: str | Path | None = None,
              dtype: torch.dtype = torch.float32, max_shard_bytes: int = MAX_SHARD_BYTES,
              sync: Callable[[BaseException | None], None] | None = None) -> Path | None:
    """Write a `LlamaForCausalLM` directory: model.safetensors (a model over `max_shard_bytes`: numbered
    shards and model.safetensors.index.json, as transformers writes them), config.json,
    generation_config.json and (with `tokenizer_dir`) the tokenizer's files, whose bos/eos/pad ids go
    into the configs. Returns `out_dir`.

    `source` is a model, a state dict, or a `Gather` that every rank of a job calls with the same names,
    a shard's worth at a time, and that returns them only on the rank that writes: that rank gets
    `out_dir` back, the others (which may pass None for it) None. The export copies one shard at a time, so with a `Gather` the writer
    never holds the whole model. `sync`, with a `Gather`: called on every rank after each shard with the
    error this rank met writing it (else None), a collective that raises on every rank when any failed
    (`kubellm.training.collective.raise_if_any_failed`), so no rank waits in the next gather for a
    writer that has stopped.

    `tokenizer_dir` may be a model directory (SFT/DPO pass the base's): its configs, manifest and
    weight files or indexes (any format, see `is_tokenizer_file`) are never copied.
    The generation config's eos list also holds the token the chat template ends a turn with
    (`end_of_turn_id`), so chat generation stops at the end of the assistant's turn."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: expected a number of bytes > 0")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight")  # the head is the embedding: not written
    gather: Gather
    if isinstance(source, (torch.nn.Module, Mapping)):
        sd = source.state_dict() if isinstance(source, torch.nn.Module) else source
        check_exportable(sd, cfg)
        sd = _strip(sd)

        def gather(names: Collection[str]) -> Mapping[str, torch.Tensor]:
            return {k: sd[k] for k in names}
    else:
        gather = source
    size = torch.empty((), dtype=dtype).element_size()
    shards = _shard_plan({k: math.prod(shape) * size for k, shape in expected.items()}, max_shard_bytes)
    files = ([WEIGHTS_NAME] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    out: Path | None = None
    weight_map: dict[str, str] = {}
    total = 0
    for fname, names in zip(files, shards, strict=True):
        chunk = gather(names)  # collective with a job's Gather
        error: BaseException | None = None
        if chunk is not None:
            try:
                if out is None:
                    if out_dir is None:
                        raise ValueError("export_hf: this rank received weights to write but no out_dir")
                    out = _fresh_export_dir(Path(out_dir))
                problems = [f"missing {k!r}" for k in names if k not in chunk] + [
                    f"{k!r} has shape {tuple(chunk[k].shape)}, the config implies {expected[k]}"
                    for k in names if k in chunk and tuple(chunk[k].shape) != expected[k]]
                if problems:
                    raise IntegrityError(f"weights to export for {out / fname}: {'; '.join(problems[:3])}")
                # clone: fused views share storage, which safetensors refuses; one shard's copies at a time
                tensors = {k: v.detach().to("cpu", dtype).contiguous().clone()
                           for k, v in state_dict_to_hf({k: chunk[k] for k in names}, cfg).items()}
                del chunk
                save_file(tensors, str(out / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, fname))
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                del tensors
            except Exception as e:  # noqa: BLE001 - raised below (through `sync` on every rank)
                error = e
        if sync is not None:
            sync(error)
        elif error is not None:
            raise error
    if out is None:
        return None
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    stops: list[int] = []
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        ids, stops, n_tok = _tokenizer_ids(tdir)
        if n_tok > cfg.vocab_size:
            raise ConfigError(f"{tdir}: tokenizer has {n_tok} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size}; ids beyond it have no embedding")
        for f in sorted(tdir.iterdir()):
            if f.is_file() and is_tokenizer_file(f.name):
                shutil.copy2(f, out / f.name)
        _set_model_max_length(out / "tokenizer_config.json", cfg.max_seq_len)
    gen: dict[str, Any] = {k: v for k, v in ids.items() if v is not None}
    if stops:
        gen["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    # the same stop list in config.json (as Llama 3.1 ships it): servers that take eos from there, not from
    # generation_config.json, stop an SFT model at <|end|> too
    conf_ids: dict[str, Any] = {**ids, **({"eos_token_id": gen["eos_token_id"]} if stops else {})}
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype=dtype, **conf_ids), indent=2) + "\n")
    gen["transformers_version"] = _transformers_version()
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _fresh_export_dir(out: Path) -> Path:
    """`out`, created, without an earlier export's weight files (left beside new ones, they would make
    the directory two models)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / WEIGHTS_NAME, out / INDEX_NAME, *(p for p in out.iterdir() if _SHARD_RE.fullmatch(p.name))]:
        old.unlink(missing_ok=True)
    return out


def _shard_plan(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into consecutive shards of at most `max_bytes` (a tensor bigger than
    that is a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _set_model_max_length(path: Path, max_seq_len: int) -> None:
    """The exported tokenizer's `model_max_length` is the model's context (the tokenizer stage, which knows
    no model, leaves transformers' 1e30: `truncation=True` then truncates nothing)."""
    if not path.is_file():
        return
    conf = read_json(path)
    if isinstance(conf, dict):
        conf["model_max_length"] = max_seq_len
        path.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    """A model directory's JSON file (config, index, generation config); IntegrityError naming it
    when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from None


def _tensor_files(d: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that should hold it (single file or sharded index).

    A directory with both model.safetensors and an index naming other files is refused: transformers
    loads model.safetensors first, vLLM the index's shards, so the directory would be two models."""
    index = d / INDEX_NAME
    single = d / WEIGHTS_NAME
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise IntegrityError(f"{index}: no 'weight_map' object")
        others = sorted({str(f) for f in weight_map.values()} - {WEIGHTS_NAME})
        if single.is_file() and others:
            raise IntegrityError(
                f"{d}: holds both {WEIGHTS_NAME} and {INDEX_NAME} (which maps tensors to {others[:3]}"
                f"{' …' if len(others) > 3 else ''}); transformers would load {WEIGHTS_NAME} and vLLM the "
                "index's shards — remove the one that is not this model's weights")
        files = {}
        for name, fname in weight_map.items():
            f = d / str(fname)
            if Path(str(fname)).is_absolute() or ".." in Path(str(fname)).parts or d.resolve() not in f.resolve().parents:
                raise IntegrityError(f"{index}: weight_map[{name!r}] = {fname!r} points outside the model directory "
                                     "(expected a shard file name inside it)")
            files[name] = f
        return files
    if not single.is_file():
        found = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        hint = f" (found {found}: pickle-based weights are not loaded; convert them to safetensors)" if found else ""
        raise IntegrityError(f"{d}: neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _unreadable_weights(path: Path, e: Exception) -> IntegrityError:
    return IntegrityError(f"{path}: cannot be read as safetensors ({e}); the file is truncated or corrupt "
                          "— re-export or re-download the model")


def _our_parts(cfg: ModelConfig) -> dict[str, list[str]]:
    """our state-dict name -> the HF tensors it is made of, concatenated by rows (the tied head is the
    embedding, so it has no entry of its own)."""
    parts = {"tok_embeddings.weight": ["model.embed_tokens.weight"]}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        parts[f"blocks.{i}.attn.qkv.weight"] = [pre + f"self_attn.{p}_proj.weight" for p in "qkv"]
        parts[f"blocks.{i}.ffn.gate_up.weight"] = [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"]
        for ours, theirs in _PER_LAYER.items():
            parts[f"blocks.{i}.{ours}"] = [pre + theirs]
    parts["norm.weight"] = ["model.norm.weight"]
    if not cfg.tie_embeddings:
        parts["output.weight"] = ["lm_head.weight"]
    return parts


def _fuse(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Our tensor from its HF parts (`_our_parts`): the one part, or the parts concatenated by rows."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=0)


class HFWeights(Mapping[str, torch.Tensor]):
    """A Llama directory's weights under our state-dict names, read from its safetensors when indexed,
    one tensor at a time (a fused `qkv` / `gate_up` concatenates its HF parts then), as `dtype` on
    `device`. A rank that fills its model or TP shard from it (`kubellm.training.topology.fill_from_dense`)
    holds one dense tensor at a time, never the whole model. Built by `open_hf`, which has checked every
    name, file and shape first; a tied model has no `output.weight` entry (the head is the embedding)."""

    def __init__(self, files: Mapping[str, Path], cfg: ModelConfig, dtype: torch.dtype,
                 device: str | torch.device) -> None:
        self.files, self.cfg, self.dtype, self.device = dict(files), cfg, dtype, device
        self.parts = _our_parts(cfg)

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Any:
        return iter(self.parts)

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's default would)
        return name in self.parts

    def __getitem__(self, name: str) -> torch.Tensor:
        hf_names = self.parts[name]
        by_file: dict[Path, list[str]] = {}
        for n in hf_names:  # a fused tensor's parts are read with one opening of each file holding them
            by_file.setdefault(self.files[n], []).append(n)
        read: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            for n, t in zip(names, _read_tensors(path, names), strict=True):
                read[n] = t.to(device=self.device, dtype=self.dtype)
        return _fuse([read[n] for n in hf_names])


def _read_tensors(path: Path, names: Sequence[str]) -> Iterator[torch.Tensor]:
    """Tensors of one safetensors file, as stored, one at a time; IntegrityError naming the file when it
    is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for n in names:
                yield f.get_tensor(n)
    except SafetensorError as e:
        raise _unreadable_weights(path, e) from None


def open_hf(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
            ) -> tuple[HFWeights, ModelConfig]:
    """A Llama directory (ours or third-party, safetensors only) as lazily read weights and its config,
    after checking, from config.json and the safetensors headers alone, that every tensor the config
    implies is there with its shape and nothing else is (errors name the file and the tensor or config
    key at fault). The tensors' data is read only when `HFWeights` is indexed; a tied model's
    `lm_head.weight`, where a directory holds one, is read now and must equal the embedding."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise IntegrityError(f"{cfg_path}: missing (not a Hugging Face model directory)")
    cfg_data = read_json(cfg_path)
    if not isinstance(cfg_data, dict):
        raise IntegrityError(f"{cfg_path}: expected a JSON object")
    cfg = config_from_hf(cfg_data, source=str(cfg_path))
    try:
        files = _tensor_files(d)
    except SafetensorError as e:
        raise _unreadable_weights(d / WEIGHTS_NAME, e) from None
    expected = hf_tensor_names(cfg)
    default_file = d / (INDEX_NAME if (d / INDEX_NAME).is_file() else WEIGHTS_NAME)
    for name in expected:
        if name not in files:
            raise IntegrityError(f"{default_file}: missing tensor {name!r} required by {cfg_path.name}")
    unexpected = sorted(n for n in files if n not in set(expected) and not _IGNORED_HF.match(n)
                        and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise IntegrityError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} "
                             f"({len(unexpected)} in all) — a feature kubellm's Llama does not have")

    # every tensor's shape from its file's header (no data read)
    hf_shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        if not path.is_file():
            raise IntegrityError(f"{path}: missing shard (holds tensor {names[0]!r})")
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise IntegrityError(f"{path}: missing tensor {name!r}")
                    hf_shapes[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as e:
            raise _unreadable_weights(path, e) from None
    with torch.device("meta"):  # the shape of every HF tensor the config implies (fused ones split)
        want = {k: tuple(v.shape) for k, v in state_dict_to_hf(Transformer(cfg).state_dict(), cfg).items()}
    for name, shape in hf_shapes.items():
        if shape != want[name]:
            raise IntegrityError(f"{files[name]}: tensor {name!r} has shape {shape}, config.json implies {want[name]}")
    weights = HFWeights(files, cfg, dtype, device)

    if cfg.tie_embeddings and "lm_head.weight" in files:
        # transformers then unties and uses this head while vLLM uses the embedding: the same
        # directory would be two different models, so only an lm_head equal to the embedding is accepted
        # (compared value for value, whatever dtypes they are stored in, a block of rows at a time)
        head_path, emb_path = files["lm_head.weight"], files["model.embed_tokens.weight"]
        rows = want["model.embed_tokens.weight"][0]
        try:
            with safe_open(str(head_path), framework="pt") as fh, safe_open(str(emb_path), framework="pt") as fe:
                head, emb = fh.get_slice("lm_head.weight"), fe.get_slice("model.embed_tokens.weight")
                same = all(torch.equal(head[i : i + _ROWS].to(torch.float64), emb[i : i + _ROWS].to(torch.float64))
                           for i in range(0, rows, _ROWS))
        except SafetensorError as e:
            raise _unreadable_weights(head_path, e) from None
        if not same:
            raise ConfigError(f"{cfg_path}: tie_word_embeddings=true but {head_path.name} holds an "
                              "'lm_head.weight' that differs from 'model.embed_tokens.weight' (transformers "
                              "would use the head, vLLM the embedding); set tie_word_embeddings to false "
                              "if the head is meant to be separate")
    return weights, cfg


def load_hf(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
            ) -> tuple[Transformer, ModelConfig]:
    """Build our Transformer from a Llama directory (ours or third-party, safetensors only), as `dtype` on
    `device`. Errors name the file and the tensor or config key at fault (`open_hf`)."""
    weights, cfg = open_hf(model_dir, dtype, device)
    with torch.device("meta"):  # no throwaway random init for a 7B model
        model = Transformer(cfg)
    sd = dict(weights.items())
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the shared Parameter; tie again
        model.output.weight = model.tok_embeddings.weight
    model.rope.to_empty(device=device)
    model.rope.reset()
    return model, cfg
