"""Train a byte-level BPE tokenizer with HF `tokenizers` and save it as a `transformers` tokenizer.

    tok = train_bpe(texts, TokenizerConfig(vocab_size=2048))
    save_hf_tokenizer(tok, TokenizerConfig(), "out/tokenizer")
    AutoTokenizer.from_pretrained("out/tokenizer").apply_chat_template(msgs, add_generation_prompt=True)

Special tokens get the first ids, in this order: bos 0, eos 1, pad 2, system 3, user 4, assistant 5,
end 6, then `extra_special_tokens`. Encoding plain text adds `<|bos|>` in front (post-processor);
documents in token shards are `[bos] + ids + [eos]`.

**Chat format** (the Jinja `chat_template` saved in the tokenizer; role markers are single tokens):

    <|bos|><|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{reply}<|end|>\\n

i.e. `bos`, then per message `<|role|>` + newline + content + `<|end|>` + newline. With
`add_generation_prompt=True` it ends with `<|assistant|>\\n`, so the model writes the reply and stops at
`<|end|>`. Each turn renders as a prefix of the longer conversation (SFT's assistant-only loss masking
relies on that). `apply_chat_template` tokenizes without adding another bos.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kubellm.tokenizer.config import TokenizerConfig


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    base = [cfg.bos_token, cfg.eos_token, cfg.pad_token, cfg.system_token, cfg.user_token,
            cfg.assistant_token, cfg.end_token]
    return base + [t for t in cfg.extra_special_tokens if t not in base]


def chat_template(cfg: TokenizerConfig) -> str:
    """The Jinja chat template for `cfg`'s role markers (see the module docstring for the format)."""
    markers = {"system": cfg.system_token, "user": cfg.user_token, "assistant": cfg.assistant_token}
    # json.dumps gives double-quoted literals with \n escapes, which Jinja reads the same way.
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] not in " + json.dumps(list(markers)) + " %}"
        "{{ raise_exception('unknown chat role ' + message['role'] + '; allowed: system, user, assistant') }}"
        "{% endif %}"
        "{{ " + json.dumps(markers) + "[message['role']] + '\\n' + message['content'] + "
        + json.dumps(cfg.end_token + "\n") + " }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + json.dumps(cfg.assistant_token + "\n") + " }}{% endif %}"
    )


def train_bpe(texts: Iterator[str], cfg: TokenizerConfig, length: int | None = None) -> Tokenizer:
    """Byte-level BPE over `texts` (streamed); specials first, the 256-byte alphabet always present."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(cfg)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    bos = tok.token_to_id(cfg.bos_token)
    # Plain `tok(text)` starts with bos, like every training document; no eos (it would end a prompt).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cfg.bos_token} $A", pair=f"{cfg.bos_token} $A $B", special_tokens=[(cfg.bos_token, bos)],
    )
    return tok


def save_hf_tokenizer(tok: Tokenizer, cfg: TokenizerConfig, out_dir: str | Path,
                      model_max_length: int | None = None) -> Path:
    """Save `tok` so that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it, with the
    chat template and bos/eos/pad set."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=cfg.bos_token, eos_token=cfg.eos_token, pad_token=cfg.pad_token,
        additional_special_tokens=special_tokens(cfg)[3:], clean_up_tokenization_spaces=False, **kwargs,
    )
    hf.chat_template = chat_template(cfg)
    hf.save_pretrained(str(out))
    _portable_tokenizer_config(out / "tokenizer_config.json")
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """Rewrite what transformers 5 saves into the fields 4.x reads too (vLLM and other consumers pin
    it): 5's `TokenizersBackend` class is unknown to 4.x and its `extra_special_tokens` list is a dict
    there (a list fails to load); `PreTrainedTokenizerFast` and `additional_special_tokens` load the
    same tokenizer in both; the chat template, which 5 saves as `chat_template.jinja` only, is also
    written where 4.x (and TGI) look for it, `chat_template` in tokenizer_config.json."""
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = path.parent / "chat_template.jinja"  # 5 writes the template apart; 4.x and TGI read it here
    if "chat_template" not in cfg and template.is_file():
        cfg["chat_template"] = template.read_text(encoding="utf-8")
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra is not None:
        cfg["extra_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
