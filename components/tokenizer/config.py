"""Tokenizer stage config (the `tokenizer:` section of the run-config)."""

from __future__ import annotations

import functools

from pydantic import Field, model_validator

from kubellm.core.config import StrictModel
from kubellm.core.manifest import stable_hash

BASE_SPECIALS = ("bos_token", "eos_token", "pad_token", "system_token", "user_token", "assistant_token",
                 "end_token")

# Fields that decide how the work is scheduled, not what it produces: left out of the config hash, so
# changing them reuses the published tokenizer and shards (and everything downstream of them).
EXECUTION_FIELDS = frozenset({"batch_size", "num_threads"})


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(default=2048, ge=260)
    """Target vocabulary size including special tokens (byte-level BPE needs ≥ 256 + specials).
    A small corpus may yield fewer; the manifest's `metadata.vocab_size` is the real size."""
    min_frequency: int = Field(default=2, ge=1)
    """Minimum pair frequency for a BPE merge."""
    bos_token: str = "<|bos|>"
    """Begin-of-document token (id 0): starts every document in the shards and every chat."""
    eos_token: str = "<|eos|>"
    """End-of-document token (id 1): ends every document in the shards."""
    pad_token: str = "<|pad|>"
    """Padding token (id 2)."""
    system_token: str = "<|system|>"
    """Chat role marker that opens a system turn."""
    user_token: str = "<|user|>"
    """Chat role marker that opens a user turn."""
    assistant_token: str = "<|assistant|>"
    """Chat role marker that opens an assistant turn (the generation prompt)."""
    end_token: str = "<|end|>"
    """Ends every chat turn; generation of an assistant reply stops at it."""
    extra_special_tokens: list[str] = Field(default_factory=list)
    """More special tokens (never split, ids after the ones above)."""
    max_train_bytes: int | None = Field(default=None, ge=1)
    """Train BPE on at most this many UTF-8 bytes of the train split (None = all of it): whole documents
    in order, stopping before the one that would go over; if the first document alone is over, BPE is
    trained on it (the report says so). `counts.bpe_train_bytes` is what was used."""
    batch_size: int = Field(default=1000, ge=1)
    """Documents per `encode_batch` call (the Rust encoder parallelises within a batch). Scheduling
    only: not part of the config hash."""
    num_threads: int | None = Field(default=None, ge=1)
    """Encoder threads (RAYON_NUM_THREADS, set for the stage's duration only; the Rust thread pool reads
    it when it first starts in the process); None = the tokenizers library default (all cores).
    Scheduling only: not part of the config hash."""
    tokens_per_shard: int = Field(default=100_000_000, ge=1)
    """Start a new `.tok` shard once the current one holds this many tokens."""

    def config_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS)))

    @model_validator(mode="after")
    def _check_specials(self) -> TokenizerConfig:
        seen: dict[str, str] = {}
        for name in BASE_SPECIALS:
            tok = getattr(self, name)
            if not tok.strip():
                raise ValueError(f"{name} is empty: every special token needs a non-blank string "
                                 "(documents and chats are built from them)")
            if tok in seen:
                raise ValueError(f"{name} and {seen[tok]} are both {tok!r}: the special tokens must differ "
                                 "(each has its own id)")
            seen[tok] = name
        blank = [i for i, t in enumerate(self.extra_special_tokens) if not t.strip()]
        if blank:
            raise ValueError(f"extra_special_tokens[{blank[0]}] is blank: expected a non-blank string")
        fields = [*((n, getattr(self, n)) for n in BASE_SPECIALS),
                  *((f"extra_special_tokens[{i}]", t) for i, t in enumerate(self.extra_special_tokens))]
        for name, tok in fields:
            if _is_bpe_token_string(tok):
                raise ValueError(
                    f"{name}={tok!r} is a string byte-level BPE can learn as an ordinary token (one letter, "
                    "digit or symbol run): it would share that token's id, so corpus text would produce the "
                    "control id and decoding would drop the text; use a delimited form such as '<|name|>'")
        n = len(seen) + len(set(self.extra_special_tokens) - set(seen))
        if self.vocab_size < 256 + n:
            raise ValueError(f"vocab_size {self.vocab_size} is below 256 byte tokens + {n} special tokens = "
                             f"{256 + n}: expected at least {256 + n}")
        return self


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet: each of its 256 characters -> the byte it stands for (printable Latin-1
    characters stand for themselves, the other bytes for characters from U+0100 on, in byte order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in kept}
    shifted = [b for b in range(256) if b not in chars.values()]
    chars.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return chars


def _is_bpe_token_string(tok: str) -> bool:
    """Whether `tok` could be a token of the byte-level BPE vocabulary, i.e. share that token's id. A
    token is spelled in the byte-level alphabet and is a run of bytes inside one pre-tokenizer piece:
    so `tok` collides when it is spelled in that alphabet and the text it stands for (`Ġthe` is " the",
    `!` is "!") is one piece, or a fragment of one character. `<|bos|>` splits into `<|`, `bos`, `|>`
    and a newline or a space is outside the alphabet: those never collide."""
    from tokenizers import pre_tokenizers

    byte_of = _byte_level_chars()
    if not tok or any(c not in byte_of for c in tok):
        return False
    raw = bytes(byte_of[c] for c in tok)
    start = 0  # a token may begin inside a character (its continuation bytes) ...
    while start < min(3, len(raw)) and 0x80 <= raw[start] <= 0xBF:
        start += 1
    for end in range(len(raw), max(start, len(raw) - 3) - 1, -1):  # ... and end inside one
        try:
            text = raw[start:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
        break
    else:
        return False  # no text holds these bytes within one piece
    if not text:
        return True  # a fragment of one character: a byte-level token
    return len(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)) == 1
