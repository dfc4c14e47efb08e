"""The tokenizer stage: HF-loadable tokenizer with chat template, shards that decode back to text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kubellm.core.errors import InputDataError
from kubellm.core.manifest import Manifest, fetch
from kubellm.tokenizer.config import TokenizerConfig
from kubellm.tokenizer.shards import TokenShardReader
from kubellm.tokenizer.stage import run


@pytest.fixture(scope="module")
def tok_dir(tokenized: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fetch(tokenized, tmp_path_factory.mktemp("tokfiles"))


def test_manifest_follows_the_contract(tokenized: Manifest) -> None:
    md = tokenized.metadata
    assert tokenized.kind == "token_shards"
    assert (md["bos_id"], md["eos_id"], md["pad_id"]) == (0, 1, 2)
    assert 260 < md["vocab_size"] <= 512 and tokenized.counts["vocab_size"] == md["vocab_size"]
    paths = {f.path for f in tokenized.files}
    assert "tokenizer/tokenizer.json" in paths and "tokenizer/tokenizer_config.json" in paths
    assert md["train_files"] == ["train/part-00000.tok"] and md["validation_files"] == ["validation/part-00000.tok"]
    assert 2.0 < tokenized.metrics["bytes_per_token"] < 8.0
    assert "bytes/token" in (tokenized.report_markdown or "")


def test_auto_tokenizer_loads_with_chat_template(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir / "tokenizer"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}
    assert list(ids.values()) == list(range(7))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Kanoreth live?"},
            {"role": "assistant", "content": "Answer: Amberlow"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhere does Kanoreth live?<|end|>\n"
                    "<|assistant|>\nAnswer: Amberlow<|end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n") and text.startswith(prompt)
    full = tok.apply_chat_template(msgs, tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    head = tok.apply_chat_template(msgs[:2], tokenize=True, add_generation_prompt=True)
    head = head["input_ids"] if hasattr(head, "keys") else head
    assert full[: len(head)] == head and full.count(0) == 1  # prefix-stable, one bos
    assert full[-2] == ids["<|end|>"]
    assert tok.decode(full) == text
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    # plain encoding starts with bos (like every document in the shards) and round-trips
    enc = tok("Kanoreth lives in Amberlow.")["input_ids"]
    assert enc[0] == 0 and tok.decode(enc, skip_special_tokens=True) == "Kanoreth lives in Amberlow."
    # fields transformers 4.x reads too (its loader rejects 5's TokenizersBackend and list-valued
    # extra_special_tokens); 5 still takes every role marker as special
    saved = json.loads((tok_dir / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in saved
    assert saved["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    # the chat template where 4.x and TGI read it too (5 saves it only as chat_template.jinja)
    assert saved["chat_template"] == (tok_dir / "tokenizer" / "chat_template.jinja").read_text() == tok.chat_template
    assert set(ids) <= set(tok.all_special_tokens)
    assert tok.decode([ids["<|user|>"], *enc[1:], ids["<|end|>"]], skip_special_tokens=True) == "Kanoreth lives in Amberlow."


def test_shards_decode_back_to_the_original_text(tokenized: Manifest, prepared: Manifest,
                                                 tok_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer" / "tokenizer.json"))
    data = fetch(prepared, tmp_path)
    for split in ("train", "validation"):
        texts = pq.read_table(data / split / "part-00000.parquet").column("text").to_pylist()
        r = TokenShardReader(tok_dir / split / "part-00000.tok", expected_vocab_size=2048)
        assert r.doc_count == len(texts) == tokenized.counts[f"{split}_documents"]
        assert r.token_count == tokenized.counts[f"{split}_tokens"]
        for i, text in enumerate(texts):
            doc = r.document(i).tolist()
            assert doc[0] == 0 and doc[-1] == 1 and 0 not in doc[1:-1] and 1 not in doc[1:-1]
            assert tok.decode(doc[1:-1], skip_special_tokens=False) == text


def test_small_shards_and_non_ascii_round_trip(tmp_path: Path) -> None:
    from kubellm.data_prep.config import DataPrepConfig
    from kubellm.data_prep.stage import run as data_prep

    texts = [f"Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e emoji \U0001f600 line {i}: " + "word " * 30 for i in range(30)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = data_prep(DataPrepConfig(validation_fraction=0.0, dedup={"near": False},
                                  filters={"min_alpha_word_fraction": 0.5, "max_top_ngram_fraction": {}}),
                   {"raw": str(tmp_path / "x.jsonl")}, str(tmp_path / "art"))
    m = run(TokenizerConfig(vocab_size=300, tokens_per_shard=100, batch_size=7), {"dataset": ds.uri},
            str(tmp_path / "art"))
    assert len(m.metadata["train_files"]) > 3 and m.metadata["validation_files"] == []
    # no validation split: no validation bytes/token (it used to be published as 0.000)
    assert "bytes_per_token" not in m.metrics and m.metrics["bytes_per_token_train"] > 1.0
    assert "n/a (the dataset has no validation documents)" in (m.report_markdown or "")
    d = fetch(m, tmp_path / "f")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer" / "tokenizer.json"))
    decoded = [tok.decode(TokenShardReader(d / f).document(i).tolist()[1:-1])
               for f in m.metadata["train_files"] for i in range(TokenShardReader(d / f).doc_count)]
    assert decoded == [t.strip() for t in texts]


def test_cli_runs_on_a_data_prep_artifact_and_refuses_other_kinds(tokenized: Manifest, prepared: Manifest,
                                                                  tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "kubellm.cli", "tokenizer", "--input", f"dataset={prepared.uri}",
                        "--output", str(tmp_path), "--set", "tokenizer.vocab_size=512",
                        "--manifest-out", str(tmp_path / "m.json")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert '"bytes_per_token"' in p.stdout and "Validation bytes/token" in p.stderr
    again = Manifest.from_json((tmp_path / "m.json").read_text())
    assert again.uri != tokenized.uri  # another output root, same content: training is deterministic
    assert {(f.path, f.sha256) for f in again.files} == {(f.path, f.sha256) for f in tokenized.files}
    with pytest.raises(InputDataError, match="expected 'dataset'"):
        run(TokenizerConfig(), {"dataset": tokenized.uri}, str(tmp_path))


def test_batched_shard_writing_matches_one_document_at_a_time(tmp_path: Path) -> None:
    """encode_split (pipelined batches, vectorised bos/eos, one write per slice) writes byte-identical
    shards to the naive per-document loop, including shard boundaries inside and across batches."""
    import pyarrow as pa

    from kubellm.tokenizer.bpe import train_bpe
    from kubellm.tokenizer.shards import TokenShardWriter
    from kubellm.tokenizer.stage import encode_split

    texts = [f"document {i} " + "word " * (i % 13) + "end." for i in range(97)] + [""]  # empty: skipped
    files = []
    for k in range(3):
        f = tmp_path / f"in/part-{k}.parquet"
        f.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": texts[k * 33 : (k + 1) * 33]}), f)
        files.append(f)
    cfg = TokenizerConfig(vocab_size=300, batch_size=7, tokens_per_shard=150)
    tok = train_bpe(iter(texts), cfg)
    vocab, bos, eos = tok.get_vocab_size(), 0, 1
    stats = encode_split(tok, files, tmp_path / "ours", "train", cfg, vocab, bos, eos)

    expected, writer, n_tokens = [], None, 0
    for text in (t for t in texts if t):
        if writer is None:
            writer = TokenShardWriter(tmp_path / "naive" / f"part-{len(expected):05d}.tok", vocab)
            expected.append(writer.path)
        ids = [bos, *tok.encode(text, add_special_tokens=False).ids, eos]
        writer.add_document(ids)
        n_tokens += len(ids)
        if writer.token_count >= cfg.tokens_per_shard:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()
    assert len(expected) > 3  # several shards, boundaries not aligned with the 7-document batches
    assert stats["files"] == [f"train/{p.name}" for p in expected]
    for p in expected:
        assert (tmp_path / "ours/train" / p.name).read_bytes() == p.read_bytes()
    assert stats["documents"] == 97 and stats["tokens"] == n_tokens
    assert stats["text_tokens"] == n_tokens - 2 * 97


def test_packed_write_names_the_document_with_a_bad_id(tmp_path: Path) -> None:
    import numpy as np

    from kubellm.tokenizer.shards import TokenShardWriter

    w = TokenShardWriter(tmp_path / "x.tok", vocab_size=10)
    w.add_document([1, 2])
    # documents count from 0 in the shard: [1, 2] is 0, the packed [3, 4], [5, 6], [12, 7] are 1–3
    with pytest.raises(InputDataError, match=r"x\.tok: document 3 has token id 12 outside \[0, 10\)"):
        w.add_packed(np.array([3, 4, 5, 6, 12, 7]), np.array([2, 2, 2]))


def test_the_writer_refuses_what_would_publish_a_corrupt_shard(tmp_path: Path) -> None:
    import numpy as np

    from kubellm.tokenizer.shards import TokenShardWriter

    w = TokenShardWriter(tmp_path / "x.tok", vocab_size=10)
    with pytest.raises(ValueError, match=r"x\.tok: document lengths must be ≥ 0, got -1"):  # offsets would run backwards
        w.add_packed(np.array([1, 2, 3]), np.array([3, -1, 1]))
    with pytest.raises(ValueError, match=r"x\.tok: token ids must be integers, got float64"):
        w.add_packed(np.array([1.7, 2.2]), np.array([2]))
    with pytest.raises(ValueError, match=r"x\.tok: document lengths must be integers, got float64"):
        w.add_packed(np.array([1, 2]), np.array([2.0]))
    with pytest.raises(ValueError, match="document 0: token ids must be integers, got float64"):
        w.add_document([1.7, 2.2])  # had been cut to [1, 2] silently
    w.add_document([1, 2])
    assert w.close() == tmp_path / "x.tok" and TokenShardReader(tmp_path / "x.tok").token_count == 2
    with pytest.raises(ValueError, match="already closed"):
        w.close()


def test_a_failed_close_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from kubellm.tokenizer.shards import TokenShardWriter

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"), TokenShardWriter(tmp_path / "x.tok", vocab_size=10) as w:
        w.add_document([1, 2])
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its .partial
    monkeypatch.undo()

    class FullFile:  # every write and flush fails, the final one inside close() too
        def __init__(self, f: object) -> None:
            self.f = f

        write = flush = full

        def close(self) -> None:
            self.f.close()  # type: ignore[attr-defined]
            full()

        closed = property(lambda self: self.f.closed)  # type: ignore[attr-defined]

    w = TokenShardWriter(tmp_path / "y.tok", vocab_size=10)
    w._f = FullFile(w._f)  # type: ignore[assignment]
    with pytest.raises(OSError, match="No space left"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_parquet_body_names_the_file(tmp_path: Path) -> None:
    import pyarrow as pa

    from kubellm.tokenizer.stage import iter_texts

    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": [f"hello world {i} " * 20 for i in range(200)]}), f, row_group_size=100,
                   compression="none", use_dictionary=False)
    raw = bytearray(f.read_bytes())
    body = raw.index(b"hello world", len(raw) // 2)  # inside the second row group's data page
    raw[body : body + 400] = b"\xff" * 400
    f.write_bytes(bytes(raw))
    with pytest.raises(InputDataError, match=r"train\.parquet: unreadable after row 100 \("):
        for _ in iter_texts([f], batch_size=100):
            pass


@pytest.mark.parametrize(("fields", "message"), [
    ({"bos_token": ""}, "bos_token is empty"),
    ({"end_token": "  "}, "end_token is empty"),
    ({"pad_token": "<|eos|>"}, "eos_token and pad_token are both '<|eos|>'|pad_token and eos_token"),
    ({"extra_special_tokens": ["<|tool|>", ""]}, r"extra_special_tokens\[1\] is blank"),
    ({"vocab_size": 260}, "vocab_size 260 is below 256 byte tokens \\+ 7 special tokens = 263"),
    ({"vocab_size": 263, "extra_special_tokens": ["<|tool|>"]}, "8 special tokens = 264"),
    # strings BPE can learn as ordinary tokens: they would share that token's id
    ({"extra_special_tokens": ["<|tool|>", "!"]}, r"extra_special_tokens\[1\]='!' is a string byte-level BPE"),
    ({"user_token": "user"}, "user_token='user' is a string byte-level BPE can learn"),
    ({"end_token": "<<<>>>"}, "end_token='<<<>>>' .* use a delimited form such as '<\\|name\\|>'"),
    # spelled in the byte-level alphabet: `Ġ` is a space, `Ġthe` " the", `Ã©` "é"; each is one piece
    ({"extra_special_tokens": ["Ġ"]}, "extra_special_tokens\\[0\\]='Ġ' is a string byte-level BPE"),
    ({"extra_special_tokens": ["Ġthe"]}, "extra_special_tokens\\[0\\]='Ġthe'"),
    ({"extra_special_tokens": ["Ã©"]}, "extra_special_tokens\\[0\\]='Ã©'"),
])
def test_special_tokens_and_vocab_size_are_checked_in_the_config(fields: dict, message: str) -> None:
    from kubellm.core.config import validate
    from kubellm.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(TokenizerConfig, fields, "run.yaml", prefix="tokenizer")
    assert TokenizerConfig(vocab_size=263).vocab_size == 263  # exactly bytes + specials is fine


@pytest.mark.parametrize("token", ["<s>", "</s>", "[PAD]", "<|im_start|>", " hello", "<|café|>", "\n<|x|>"])
def test_delimited_special_tokens_are_accepted(token: str) -> None:
    # split by the byte-level pre-tokenizer into several pieces, or respelled by it
    # (" hello" is "Ġhello"): no BPE token can ever be spelled like them
    assert TokenizerConfig(extra_special_tokens=[token]).extra_special_tokens == [token]


def test_why_undelimited_special_tokens_are_refused(tmp_path: Path) -> None:
    """With `!` as a special token (the check bypassed) the trainer gives the byte `!` that id, so corpus
    text produces the control id and decoding drops it; a delimited token is encoded as plain text."""
    from kubellm.tokenizer.bpe import special_tokens, train_bpe
    from kubellm.tokenizer.stage import corpus_encoder

    text = "hello  world! <|tool|> call"
    for extra, collides in (("!", True), ("Ġ", True), ("<|tool|>", False)):
        cfg = TokenizerConfig.model_construct(**{**TokenizerConfig(vocab_size=300).model_dump(),
                                                 "extra_special_tokens": [extra]})
        tok = train_bpe(iter([text] * 20), cfg)
        ids = corpus_encoder(tok).encode(text, add_special_tokens=False).ids
        hit = {tok.token_to_id(t) for t in special_tokens(cfg)} & set(ids)
        assert bool(hit) == collides, (extra, ids)
        assert (tok.decode(ids) == text) != collides
