"""SFT/DPO input files: JSON lines, gzipped or not, are read; every other format a source can name
(a JSON array, parquet, text, a hub dataset) is refused up front naming the file; messages name the
file the user gave (the s3:// URI), not the local staged copy."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from kubellm.core.errors import InputDataError
from kubellm.sft.data import SkipReport, read_chat_jsonl, read_records
from tests.sft.chatkit import CONV, write_jsonl


def _parse_never(rec: Any, where: str) -> Any:
    raise AssertionError(f"{where} was parsed: the file should have been refused before any was read")


@pytest.mark.parametrize("name", ["chat.jsonl.gz", "chat.JSONL.GZ", "chat.ndjson", "chat.ndjson.gz", "chat.json",
                                  "chat.json.gz"])
def test_json_lines_gzipped_or_not_are_read(project_tok: Any, tmp_path: Path, name: str) -> None:
    # before: a gzipped file was read as raw bytes, every line a malformed record ("0 usable")
    f = write_jsonl(tmp_path / name, [CONV] * 6, gz=name.lower().endswith(".gz"))
    rep = SkipReport()
    assert len(list(read_chat_jsonl([f], project_tok, 128, rep, "fail"))) == 6
    assert rep.total == 0


def test_a_json_array_is_refused_before_any_file_is_read(tmp_path: Path) -> None:
    # before: the whole array was one malformed record
    good = write_jsonl(tmp_path / "a.jsonl", [CONV])
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([CONV, CONV]))
    with pytest.raises(InputDataError, match=r"b\.json: a JSON array; SFT and DPO read JSON lines.*jq -c"):
        read_records([good, arr], _parse_never, SkipReport())
    gz = tmp_path / "c.json.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf  " + json.dumps([CONV]).encode()))
    with pytest.raises(InputDataError, match=r"c\.json\.gz: a JSON array"):
        read_records([good, gz], _parse_never, SkipReport())


@pytest.mark.parametrize(("name", "what"), [("README.txt", "a text file"), ("notes.md", "a text file"),
                                            ("part-0.parquet", "a parquet file"),
                                            ("chat.csv", "an unknown format")])
def test_other_formats_are_refused_naming_the_file(tmp_path: Path, name: str, what: str) -> None:
    # before: a README.txt or a parquet file in the chat directory became bad records
    good = write_jsonl(tmp_path / "a.jsonl", [CONV])
    other = tmp_path / name
    other.write_bytes(b"PAR1 not json\n")
    with pytest.raises(InputDataError, match=rf"{name}: {what}; SFT and DPO read JSON lines: \.jsonl, \.ndjson"):
        read_records([good, other], _parse_never, SkipReport())


def test_a_hub_dataset_is_refused_by_name() -> None:
    # before: a bare FileNotFoundError for the path "hf:org/x"
    with pytest.raises(InputDataError, match=r"^hf:org/x: a Hugging Face hub dataset; SFT and DPO read files"):
        read_records([Path("hf:org/x")], _parse_never, SkipReport())


def test_a_missing_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"gone\.jsonl: no such file"):
        read_records([tmp_path / "gone.jsonl"], _parse_never, SkipReport())


def test_a_truncated_gzip_fails_naming_the_file_and_line(project_tok: Any, tmp_path: Path) -> None:
    # before: a bare EOFError from gzip
    f = write_jsonl(tmp_path / "chat.jsonl.gz", [CONV] * 200, gz=True)
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(InputDataError, match=r"chat\.jsonl\.gz: cannot be read past line \d+ \(EOFError"):
        list(read_chat_jsonl([f], project_tok, 128, SkipReport()))


def test_messages_name_the_label_of_a_staged_file(project_tok: Any, tmp_path: Path) -> None:
    # before: errors named the local temp copy (/tmp/kubellm-sft-xyz/train.jsonl:3)
    local = write_jsonl(tmp_path / "00000-train.jsonl", [CONV, "{not json", {"messages": [CONV["messages"][0]]}])
    uri = "s3://bucket/chat/train.jsonl"
    rep = SkipReport()
    assert len(list(read_chat_jsonl([local], project_tok, 128, rep, labels={local: uri}))) == 1
    assert [e.split(": ")[0] for e in rep.examples] == [f"{uri}:2", f"{uri}:3"]
    assert not any(str(tmp_path) in e for e in rep.examples)
    with pytest.raises(InputDataError, match=rf"^{uri}:2: not valid JSON"):
        list(read_chat_jsonl([local], project_tok, 128, SkipReport(), "fail", labels={local: uri}))
    bad = tmp_path / "00001-notes.txt"
    bad.write_text("hello\n")
    with pytest.raises(InputDataError, match=r"^s3://bucket/chat/notes\.txt: a text file"):
        read_records([bad], _parse_never, SkipReport(), labels={bad: "s3://bucket/chat/notes.txt"})


def test_staged_s3_objects_are_named_by_their_uri(project_tok: Any, s3_bucket: str, tmp_path: Path) -> None:
    """The mapping a stage builds from resolve_sources/stage_local: every message names the s3:// URI."""
    from kubellm.core.storage import storage_for
    from kubellm.data_prep.sources import resolve_sources, stage_local

    data = gzip.compress((json.dumps(CONV) + "\n" + json.dumps({"messages": {"role": "user"}}) + "\n").encode())
    uri = f"{s3_bucket}/chat/train.jsonl.gz"
    storage_for(uri).write_bytes(uri, data)
    sources = resolve_sources(f"{s3_bucket}/chat")
    staged = tmp_path / "staged"
    staged.mkdir()
    labels = {stage_local(s, staged): s.uri for s in sources}
    rep = SkipReport()
    assert len(list(read_chat_jsonl(list(labels), project_tok, 128, rep, labels=labels))) == 1
    assert rep.examples == [f"{uri}:2: malformed_record ('messages' must be a non-empty list of "
                            "{role, content} objects, got dict)"]
