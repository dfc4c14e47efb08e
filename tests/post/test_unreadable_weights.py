"""A model directory whose safetensors are truncated or corrupt: a clear error naming the file
(from load_hf, so from every stage and `kubellm generate`), not a raw SafetensorError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kubellm.core.errors import IntegrityError
from kubellm.model import Transformer
from kubellm.model.config import ModelConfig
from kubellm.model.hf import INDEX_NAME, WEIGHTS_NAME, export_hf, load_hf


def _export(tok_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tok_dir))
    cfg = ModelConfig(vocab_size=n, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    torch.manual_seed(0)
    export_hf(Transformer(cfg), cfg, out, tokenizer_dir=tok_dir)
    return out


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_truncated_weights_name_the_file(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    d = _export(chat_tokenizer_dir, tmp_path / "m")
    _truncate(d / WEIGHTS_NAME)
    with pytest.raises(IntegrityError, match=rf"{WEIGHTS_NAME}: cannot be read as safetensors .*truncated or corrupt"):
        load_hf(d)


def test_truncated_shard_names_the_shard(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    d = _export(chat_tokenizer_dir, tmp_path / "m")
    shard = d / "model-00001-of-00001.safetensors"
    (d / WEIGHTS_NAME).rename(shard)
    with safe_open(str(shard), framework="pt") as f:
        names = list(f.keys())
    (d / INDEX_NAME).write_text(json.dumps({"weight_map": {n: shard.name for n in names}}))
    load_hf(d)  # the sharded layout loads
    _truncate(shard)
    with pytest.raises(IntegrityError, match=rf"{shard.name}: cannot be read as safetensors"):
        load_hf(d)


def test_generate_reports_it_without_a_traceback(chat_tokenizer_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from kubellm.cli import main

    d = _export(chat_tokenizer_dir, tmp_path / "m")
    _truncate(d / WEIGHTS_NAME)
    assert main(["generate", "--model", str(d), "--chat", "hi", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{d / WEIGHTS_NAME}: cannot be read as safetensors" in err and "Traceback" not in err
