"""Every bad-record kind is skipped, counted and named (file + line/offset), or fails the stage; a file
that cannot be read to its end fails the stage naming where it broke, and nothing is published."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubellm.core.errors import InputDataError
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.stage import run

TEXT = ("Velmora is a quiet city with old stone bridges, a busy market and a harbour where the "
        "sailors sing in the evening; document {i} tells the story of its bakers and painters.")


def _good(i: int) -> bytes:
    return (json.dumps({"text": TEXT.format(i=i)}) + "\n").encode()


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [_good(i) for i in range(40)]
    lines[3] = b'{"text": "broken \xff\xfe utf-8 bytes in an otherwise fine record"}\n'
    lines[5] = b'{"text": "a lone surrogate \\ud800 sneaks into this record"}\n'
    lines[7] = b'{"text": "a NUL \\u0000 byte hides inside this record"}\n'
    lines[9] = b'{"text": "   \\n\\t  "}\n'
    lines[11] = (json.dumps({"text": "huge " * 1000}) + "\n").encode()
    lines[13] = b'{"text": "this JSON line is cut off\n'
    lines[15] = b'{"body": "no text field here"}\n'
    (raw / "records.jsonl").write_bytes(b"".join(lines))
    # a gzip and a parquet file, read whole, a text (too large) and a JSON-array record among them
    with gzip.open(raw / "more.jsonl.gz", "wb") as f:
        f.write(b"".join(_good(100 + i) for i in range(20)))
    rows = [TEXT.format(i=300 + i) for i in range(20)]
    rows[4] = "huge " * 1000
    pq.write_table(pa.table({"text": rows}), raw / "rows.parquet")
    (raw / "array.json").write_text(json.dumps([{"text": TEXT.format(i=500 + i)} for i in range(9)]
                                               + [{"text": 17}]))
    # a text file with a raw NUL byte in one paragraph and invalid UTF-8 in another
    (raw / "notes.txt").write_bytes(
        TEXT.format(i=400).encode() + b"\n\nbad \x00 paragraph here\n\n" + b"caf\xe9 latin-1\n\n"
        + TEXT.format(i=401).encode() + b"\n"
    )
    return raw


def _cfg(**kw: object) -> DataPrepConfig:
    return DataPrepConfig(max_doc_bytes=2000, validation_fraction=0.0, **kw)


def test_bad_records_are_skipped_counted_and_named(bad_inputs: Path, tmp_path: Path) -> None:
    m = run(_cfg(max_bad_fraction=0.5), {"raw": str(bad_inputs)}, str(tmp_path / "out"))
    c = m.counts
    expected = {"invalid_utf8": 2, "lone_surrogate": 1, "nul_byte": 2, "empty": 1, "too_large": 2,
                "malformed_json": 1, "missing_field": 1, "not_text": 1}
    for kind, n in expected.items():
        assert c[f"removed_{kind}"] == n, kind
    assert c["bad_records"] == sum(expected.values())
    where = {(Path(e["where"].rpartition(":")[0]).name, e["reason"]): e["where"] for e in m.metadata["bad_records"]}
    rec = str(bad_inputs / "records.jsonl")
    lines = (bad_inputs / "records.jsonl").read_bytes().splitlines(keepends=True)
    start = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    # invalid UTF-8: the byte offset of the first bad byte; others: the start of the line
    bad_byte = start[3] + lines[3].index(b"\xff")
    assert where["records.jsonl", "invalid_utf8"] == f"{rec}:line 4 (byte {bad_byte})"
    assert where["records.jsonl", "lone_surrogate"] == f"{rec}:line 6 (byte {start[5]})"
    assert where["records.jsonl", "malformed_json"].startswith(f"{rec}:line 14 ")
    assert where["records.jsonl", "too_large"].startswith(f"{rec}:line 12 ")
    assert where["rows.parquet", "too_large"] == f"{bad_inputs / 'rows.parquet'}:row 4"
    assert where["array.json", "not_text"] == f"{bad_inputs / 'array.json'}:element 9 (byte 1666)"
    # the good records survive: 33 from records.jsonl, 20 from the gzip, 19 rows, 9 elements, 2 paragraphs
    assert c["documents_in"] == 33 + 20 + 19 + 9 + 2
    assert "| bad record | too_large | 2 | 10," in m.report_markdown  # 5,000 + 5,013 bytes, not 0
    assert "records.jsonl:line 4" in m.report_markdown


def test_too_many_bad_records_fail_with_the_names(bad_inputs: Path, tmp_path: Path) -> None:
    with pytest.raises(InputDataError) as e:
        run(_cfg(max_bad_fraction=0.01), {"raw": str(bad_inputs)}, str(tmp_path / "out"))
    msg = str(e.value)
    assert "max_bad_fraction=0.01" in msg and "records.jsonl:line 4" in msg and "invalid_utf8" in msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("_manifest.json"))


def test_cli_reports_bad_input_without_a_traceback(bad_inputs: Path, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "kubellm.cli", "data-prep", "--input", f"raw={bad_inputs}",
                        "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "error:" in p.stderr and "records.jsonl:line 4" in p.stderr
    assert "skipping bad record" in p.stderr  # each bad record is logged with its place


def test_missing_source_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="no such file"):
        run(DataPrepConfig(), {"raw": str(tmp_path / "nope")}, str(tmp_path / "out"))
    (tmp_path / "x.csv").write_text("a,b\n")
    from kubellm.core.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown format"):
        run(DataPrepConfig(), {"raw": str(tmp_path / "x.csv")}, str(tmp_path / "out"))
