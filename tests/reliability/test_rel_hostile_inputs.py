"""Hostile inputs through the STAGES (kubellm.stages.run_stage and the CLI): each is skipped and
counted in the stage report, or fails with an error naming the file and record/offset — and nothing
already published in the same output root changes by a single byte.

    .venv/bin/python -m pytest tests/reliability/test_rel_hostile_inputs.py -q

Setup: a good demo corpus goes through data-prep and tokenizer into `out/`; the sha256 of every file
under `out/` is the baseline. Then, into that same `out/`:
* data-prep on a corpus with invalid UTF-8, a lone surrogate, NUL bytes, empty and whitespace-only
  documents, a single 50 MB line and malformed JSON lines: skipped and counted (a report naming
  file:line), or, under the default bad-record threshold, an InputDataError naming them and nothing
  published; a truncated gzip or parquet: an InputDataError naming the file, nothing published;
* tokenizer on a prefix whose manifest never landed: refused;
* pretrain on token shards with a wrong magic, a truncated body, out-of-range ids: each refused
  naming the shard, before any training;
* SFT on chat records with an unknown role or no assistant turn, DPO on a pair with identical texts
  (`on_bad_record=fail`): refused naming file:line;
* a run-config with a wrong type and an unknown key through `kubellm pretrain --config`: exit 2-ish,
  a message naming both fields, no traceback.
The per-record unit cases live in tests/data, tests/post and tests/training.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubellm.core.errors import ConfigError, InputDataError, KubellmError, ManifestMissingError
from kubellm.runconfig import load_run_config
from kubellm.stages import run_stage

TEXT = ("Velmora is a quiet city with old stone bridges, a busy market and a harbour where the sailors "
        "sing in the evening; record {i} tells the story of its bakers and painters.")


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _manifests(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("_manifest.json")}


@pytest.fixture(autouse=True)
def _no_leaked_process_group() -> Iterator[None]:
    """The 1-process stages below train in this process: `init_distributed` sets RANK/WORLD_SIZE/
    MASTER_* in os.environ and creates a process group. Left behind, later stages in this pytest
    process would think they are torchrun workers (and child processes would inherit MASTER_PORT)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if dist.is_initialized():
        # through DeepSpeed, which also drops the groups it cloned from this world (torch's own destroy
        # leaves them cached, and the next engine built in this process would meet a dead group)
        ds_comm.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from kubellm.data_prep.demo_world import generate

    base = tmp_path_factory.mktemp("hostile")
    world = generate(base / "world", seed=0, scale=0.2)
    out = base / "out"
    cfg = load_run_config(preset="debug", overrides=["tokenizer.vocab_size=400", "data_prep.validation_fraction=0"])
    data = run_stage("data_prep", cfg.data_prep, {"raw": str(world["corpus"])}, str(out))
    tok = run_stage("tokenizer", cfg.tokenizer, {"dataset": data.uri}, str(out))
    return {"out": out, "base": base, "cfg": cfg, "data": data, "tok": tok, "world": world}


@pytest.fixture
def untouched(published: dict):  # noqa: ANN201
    """After the test: every file published before it is byte-identical."""
    out = published["out"]
    before = _snapshot(out)
    yield
    after = _snapshot(out)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"published files changed or vanished: {changed[:5]}"


def _hostile_corpus(raw: Path) -> Path:
    raw.mkdir(parents=True)
    good = [(json.dumps({"text": TEXT.format(i=i)}) + "\n").encode() for i in range(60)]
    lines = list(good)
    lines[2] = b'{"text": "broken \xff\xfe utf-8 in an otherwise fine record"}\n'
    lines[4] = b'{"text": "a lone surrogate \\ud800 in this record"}\n'
    lines[6] = b'{"text": "a NUL \\u0000 byte in this record"}\n'
    lines[8] = b'{"text": ""}\n'
    lines[10] = b'{"text": "   \\n\\t   "}\n'
    lines[12] = b'{"text": "cut off JSON\n'
    lines[14] = b"[1, 2, 3]\n"
    (raw / "records.jsonl").write_bytes(b"".join(lines))
    # a single 50 MB line (one JSON record of 50 MB)
    with open(raw / "huge.jsonl", "wb") as f:
        f.write(b'{"text": "' + b"lorem " * (50 * 1024 * 1024 // 6) + b'"}\n')
        f.write(good[0])
    return raw


def _cut_files(raw: Path) -> dict[str, Path]:
    """A truncated gzip and a truncated parquet: their loss cannot be counted record by record."""
    good = [(json.dumps({"text": TEXT.format(i=i)}) + "\n").encode() for i in range(60)]
    full = gzip.compress(b"".join(good))
    (raw / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [TEXT.format(i=i) for i in range(20)]}), buf)
    (raw / "cut.parquet").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"gzip": raw / "cut.jsonl.gz", "parquet": raw / "cut.parquet"}


def test_data_prep_skips_and_counts_or_fails_naming_the_record(published: dict, untouched: None) -> None:
    out, cfg = published["out"], published["cfg"]
    raw = _hostile_corpus(published["base"] / "hostile_raw")
    before = _manifests(out)
    with pytest.raises(InputDataError) as err:  # the default threshold: 1% bad records fails the stage
        run_stage("data_prep", cfg.data_prep, {"raw": str(raw)}, str(out))
    msg = str(err.value)
    assert "max_bad_fraction" in msg and "records.jsonl:line 3" in msg, msg
    assert _manifests(out) == before  # nothing published

    lenient = cfg.data_prep.model_copy(update={"max_bad_fraction": 0.5})
    m = run_stage("data_prep", lenient, {"raw": str(raw)}, str(out))
    c = m.counts
    for kind in ("invalid_utf8", "lone_surrogate", "nul_byte", "empty", "too_large", "malformed_json"):
        assert c.get(f"removed_{kind}", 0) >= 1, (kind, c)
    where = {e["reason"]: e["where"] for e in m.metadata["bad_records"]}
    assert where["too_large"].startswith(f"{raw / 'huge.jsonl'}:line 1")  # the 50 MB line, named
    assert where["invalid_utf8"].startswith(f"{raw / 'records.jsonl'}:line 3")
    assert "huge.jsonl:line 1" in m.report_markdown
    assert c["documents_out"] > 0

    # a file cut short loses an unknown number of records: the stage fails naming it, whatever the
    # threshold, and publishes nothing
    for name, cut in _cut_files(raw).items():
        before = _manifests(out)
        with pytest.raises(InputDataError, match=str(cut)):
            run_stage("data_prep", lenient, {"raw": str(raw)}, str(out))
        assert _manifests(out) == before, name
        cut.unlink()


def test_tokenizer_refuses_a_prefix_without_manifest(published: dict, untouched: None) -> None:
    out, cfg = published["out"], published["cfg"]
    torn = out / "data_prep" / "torn-prefix"
    (torn / "train").mkdir(parents=True)
    (torn / "train" / "part-00000.parquet").write_bytes(b"half an upload")
    try:
        with pytest.raises(ManifestMissingError, match="torn-prefix.*not a committed artifact"):
            run_stage("tokenizer", cfg.tokenizer, {"dataset": str(torn)}, str(out))
    finally:
        import shutil

        shutil.rmtree(torn)


def _bad_shard(kind: str, path: Path, vocab: int) -> None:
    from kubellm.tokenizer.shards import HEADER_SIZE, TokenShardWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with TokenShardWriter(path, vocab) as w:
        for i in range(50):
            w.add_document([1, *[(i + j) % (vocab - 3) + 3 for j in range(60)], 2])
    data = bytearray(path.read_bytes())
    if kind == "wrong_header":
        data[:8] = b"NOTATOK\0"
    elif kind == "truncated_body":
        data = data[: HEADER_SIZE + (len(data) - HEADER_SIZE) // 2]
    elif kind == "out_of_range_ids":
        data[HEADER_SIZE + 10: HEADER_SIZE + 12] = np.array([vocab + 7], dtype="<u2").tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind,reason", [("wrong_header", "magic"), ("truncated_body", "size|truncated|bytes"),
                                         ("out_of_range_ids", r"id|vocab")],
                         ids=["wrong_header", "truncated_body", "out_of_range_ids"])
def test_pretrain_refuses_bad_token_shards_naming_the_file(published: dict, untouched: None, kind: str,
                                                           reason: str) -> None:
    from kubellm.core.manifest import publish_dir, stable_hash

    out, cfg, tok = published["out"], published["cfg"], published["tok"]
    vocab = int(tok.metadata["vocab_size"])
    src = published["base"] / f"shards-{kind}"
    _bad_shard(kind, src / "train" / f"bad-{kind}.tok", vocab)
    tokens = publish_dir(src, str(published["base"] / "store" / kind), kind="token_shards",
                         metadata={**tok.metadata}, config_hash=stable_hash(kind))
    pcfg = cfg.pretrain.model_copy(deep=True)
    pcfg.launch.nproc_per_node = 1
    pcfg.model.overrides["vocab_size"] = vocab
    pcfg.data.cache_dir = str(published["base"] / f"cache-{kind}")
    pcfg.train.device, pcfg.train.max_steps = "cpu", 2
    before = _manifests(out)
    with pytest.raises((InputDataError, KubellmError)) as err:
        run_stage("pretrain", pcfg, {"tokens": tokens.uri}, str(out))
    msg = str(err.value)
    assert f"bad-{kind}.tok" in msg, msg
    import re

    assert re.search(reason, msg, re.I), msg
    assert _manifests(out) == before


def test_sft_and_dpo_refuse_bad_records_naming_them(published: dict, untouched: None) -> None:
    import torch

    from kubellm.model import Transformer
    from kubellm.model.config import ModelConfig
    from kubellm.model.hf import export_hf

    out, cfg, tok, base = published["out"], published["cfg"], published["tok"], published["base"]
    tok_dir = base / "tok"
    from kubellm.core.manifest import fetch

    fetch(tok, tok_dir, paths=[f.path for f in tok.files if f.path.startswith("tokenizer/")])
    mcfg = ModelConfig(vocab_size=int(tok.metadata["vocab_size"]), dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                       ffn_dim=64, max_seq_len=64)
    torch.manual_seed(0)
    export_hf(Transformer(mcfg), mcfg, base / "base-model", tokenizer_dir=tok_dir / "tokenizer")
    chat = base / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "wizard", "content": "abracadabra"}, {"role": "assistant", "content": "no"}]},
    ]) + "\n")
    prefs = base / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q2", "chosen": "same text", "rejected": "same text"},
    ]) + "\n")
    fast = {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": 1, "seq_len": 64, "device": "cpu"}
    before = _manifests(out)
    sft = cfg.sft.model_copy(update={"on_bad_record": "fail"}, deep=True)
    sft.train = sft.train.model_copy(update=fast)
    sft.launch.nproc_per_node = 1
    with pytest.raises(InputDataError, match=r"chat.jsonl:2.*wizard"):
        run_stage("sft", sft, {"model": str(base / "base-model"), "chat": str(chat)}, str(out))
    dpo = cfg.dpo.model_copy(update={"on_bad_record": "fail"}, deep=True)
    dpo.train = dpo.train.model_copy(update=fast)
    dpo.launch.nproc_per_node = 1
    with pytest.raises(InputDataError, match=r"prefs.jsonl:2.*identical"):
        run_stage("dpo", dpo, {"model": str(base / "base-model"), "preferences": str(prefs)}, str(out))
    assert _manifests(out) == before


def test_bad_run_config_names_the_fields_without_a_traceback(published: dict, untouched: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from kubellm.cli import main

    bad = published["base"] / "bad-run.yaml"
    bad.write_text("pretrain:\n  train:\n    max_steps: ten\n    warp_drive: true\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(str(bad))
    assert "pretrain.train.max_steps" in str(err.value) and "warp_drive" in str(err.value)
    with contextlib.suppress(SystemExit):
        code = main(["pretrain", "--config", str(bad), "--input", f"tokens={published['tok'].uri}",
                     "--output", str(published["out"])])
        assert code != 0
    stderr = capsys.readouterr().err
    assert "max_steps" in stderr and "warp_drive" in stderr and "Traceback" not in stderr
