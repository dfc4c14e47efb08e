"""The project's own chat tokenizer (kubellm.tokenizer.bpe: byte-level BPE, role markers, chat template),
trained here on a few sums, and small helpers for writing chat/preference files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

USER = {"role": "user", "content": "What is 1 plus 2?"}
ASSISTANT = {"role": "assistant", "content": "3"}
CONV = {"messages": [USER, ASSISTANT]}


def build_project_tokenizer(out: Path) -> Path:
    from kubellm.tokenizer.bpe import save_hf_tokenizer, train_bpe
    from kubellm.tokenizer.config import TokenizerConfig

    cfg = TokenizerConfig(vocab_size=400)
    texts = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(30) for b in range(10)]
    return save_hf_tokenizer(train_bpe(iter(texts), cfg), cfg, out)


def write_jsonl(path: Path, rows: list[Any], gz: bool = False) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path
