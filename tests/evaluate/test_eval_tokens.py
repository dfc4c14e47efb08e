"""The tokens input for held-out perplexity: shards encoded with another tokenizer, or holding no
documents, are refused before any model is evaluated (and nothing is published)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalkit import build_tokenizer, eval_config, write_validation_shards

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.storage import storage_for
from kubellm.evaluate import harness, stage


@pytest.fixture(scope="module")
def other_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizers trained on other text: one with a smaller vocabulary, one with the same size (384)."""
    root = tmp_path_factory.mktemp("othertok")
    texts = [f"zzz qqq {i} xylophone {i * 7} marmalade" for i in range(400)] + ["hello world"] * 10
    build_tokenizer(root / "small", texts, vocab_size=300)
    build_tokenizer(root / "same", texts + [f"The number {i} plus {i} is {i + i}." for i in range(12)],
                    vocab_size=384)
    return {"small": root / "small", "same": root / "same"}


def _no_eval(*a, **k):  # noqa: ANN002, ANN003
    raise AssertionError("a model was loaded before the bad tokens input was refused")


def test_shards_of_another_tokenizer_are_refused(hf_exports, other_tokenizers, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # before the fix: perplexity 371 "measured" on ids that mean other tokens to the model
    root = str(tmp_path / "art")
    monkeypatch.setattr(harness, "load_model", _no_eval)
    small = write_validation_shards(root, other_tokenizers["small"], name="small")
    with pytest.raises(InputDataError, match=r"model a \(.*\): its tokenizer has 38\d tokens but the tokens "
                                             r"input's validation shards .* 300-token vocabulary"):
        stage.run(eval_config(), {"models": str(hf_exports["a"]), "tokens": small.uri}, root)
    same = write_validation_shards(root, other_tokenizers["same"], with_tokenizer=True, name="same")
    assert len(json.loads((other_tokenizers["same"] / "tokenizer.json").read_text())["model"]["vocab"]) > 300
    with pytest.raises(InputDataError, match=r"model a \(.*\): its tokenizer \(\d+ tokens\) is not the tokens "
                                             r"input's tokenizer .* token/id pairs differ"):
        stage.run(eval_config(), {"models": str(hf_exports["a"]), "tokens": same.uri}, root)
    assert not Path(root, "evaluate").exists()


def test_matching_tokenizer_is_accepted(hf_exports, tmp_path: Path) -> None:
    root = str(tmp_path / "art")
    tokens = write_validation_shards(root, hf_exports["a"], with_tokenizer=True)
    m = stage.run(eval_config(tasks=["kubellm_knowledge"], limit=1),
                  {"models": f"{hf_exports['a']},{hf_exports['b']}", "tokens": tokens.uri}, root)
    results = json.loads(storage_for(m.uri).read_bytes(m.file_uri("results.json")))
    assert all(x["scores"]["perplexity"]["tokens"] > 50 for x in results["models"])


def test_empty_validation_shards_are_refused_before_evaluating(hf_exports, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "art")
    monkeypatch.setattr(harness, "load_model", _no_eval)
    empty = write_validation_shards(root, hf_exports["a"], texts=())
    with pytest.raises(InputDataError, match=r"tokens input .*val0: the validation shards \['validation/00000.tok'\] "
                                             r"hold no predictable tokens"):
        stage.run(eval_config(), {"models": str(hf_exports["a"]), "tokens": empty.uri}, root)
    assert not Path(root, "evaluate").exists()


def test_perplexity_window_longer_than_the_model_positions_is_refused(hf_exports, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "art")
    monkeypatch.setattr(harness, "load_model", _no_eval)
    tokens = write_validation_shards(root, hf_exports["a"])
    with pytest.raises(ConfigError, match=r"evaluate.perplexity_seq_len 512 exceeds model a's "
                                          r"max_position_embeddings 256 .*set evaluate.perplexity_seq_len ≤ 256"):
        stage.run(eval_config(perplexity_seq_len=512), {"models": str(hf_exports["a"]), "tokens": tokens.uri}, root)
    assert not Path(root, "evaluate").exists()


def test_a_validation_shard_with_a_corrupt_offset_table_fails_before_any_model_is_scored(tmp_path: Path) -> None:
    import struct

    from kubellm.core.manifest import publish_dir
    from kubellm.tokenizer.shards import HEADER_SIZE, TokenShardWriter

    d = tmp_path / "art"
    shard = d / "validation" / "00000.tok"
    with TokenShardWriter(shard, 512) as w:
        w.add_document(list(range(100)))
        w.add_document(list(range(50)))
    raw = bytearray(shard.read_bytes())
    table = HEADER_SIZE + 150 * 2  # uint16 tokens, then offsets 0, 100, 150
    raw[table + 8: table + 16] = struct.pack("<Q", 160)  # 0, 160, 150: goes back
    shard.write_bytes(bytes(raw))
    m = publish_dir(d, str(tmp_path / "store" / "tokenizer" / "x"), kind="token_shards", metadata={"vocab_size": 512})
    with pytest.raises(InputDataError, match=r"00000\.tok: document offset 2 is 150, below offset 1 = 160"):
        stage.validation_shards(m.uri, tmp_path / "work")
