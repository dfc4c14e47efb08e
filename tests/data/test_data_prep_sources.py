"""How each raw format is read (kubellm.data_prep.sources): text documents kept or skipped whole, a
leading BOM ignored, and a file that cannot be read to its end failing the stage (naming where it
broke) instead of being counted as one bad record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kubellm.core.errors import InputDataError
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.sources import Record, read_records, resolve_sources
from kubellm.data_prep.stage import run

TEXT = ("Velmora is a quiet city with old stone bridges, a busy market and a harbour where the "
        "sailors sing in the evening; document {i} tells the story of its bakers and painters.")
BOM = b"\xef\xbb\xbf"


def _read(path: Path, max_bytes: int = 8 << 20, sample_by: str = "paragraph", field: str = "text") -> list[Record]:
    [source] = resolve_sources(str(path))
    return list(read_records(source, path, field=field, max_bytes=max_bytes, sample_by=sample_by))


def _kinds(recs: list[Record]) -> list[str]:
    return [r.reason or "ok" for r in recs]


# --- plain text: a document is kept or skipped whole ----------------------------------------

def test_text_paragraph_over_max_doc_bytes_is_one_bad_record_and_nothing_of_it_kept(tmp_path: Path) -> None:
    big = "\n".join(f"line {i} of a long paragraph about the harbour " + "x" * 40 for i in range(40)) + "\n"
    assert len(big) > 3000 and max(len(x) for x in big.splitlines()) < 1000
    p = tmp_path / "a.txt"
    p.write_text(TEXT.format(i=1) + "\n\n" + big + "\n" + TEXT.format(i=2) + "\n")
    recs = _read(p, max_bytes=2000)
    assert _kinds(recs) == ["ok", "too_large", "ok"]
    bad = recs[1]
    assert bad.where == f"{p}:line 3 (byte {len(TEXT.format(i=1)) + 2})" and bad.nbytes == len(big)
    assert str(len(big)) in bad.detail and "max_doc_bytes=2000" in bad.detail
    assert [r.text for r in recs if r.text] == [TEXT.format(i=1) + "\n", TEXT.format(i=2) + "\n"]


def test_text_paragraph_with_a_gigantic_or_undecodable_line_is_skipped_whole(tmp_path: Path) -> None:
    """The head and tail lines of such a paragraph are not kept as documents of their own."""
    head, tail = b"the head of the paragraph\n", b"and its tail\n"
    p = tmp_path / "a.txt"
    p.write_bytes(head + b"y" * 5000 + b"\n" + tail + b"\n" + head + b"caf\xe9 au lait\n" + tail + b"\n"
                  + TEXT.format(i=3).encode() + b"\n")
    recs = _read(p, max_bytes=2000)
    assert _kinds(recs) == ["too_large", "invalid_utf8", "ok"]
    assert recs[0].where == f"{p}:line 1 (byte 0)" and recs[0].nbytes == len(head) + 5001 + len(tail)
    second = len(head) + 5001 + len(tail) + 1
    assert recs[1].where == f"{p}:line 6 (byte {second + len(head) + 3})"  # the bad byte
    assert recs[2].text == TEXT.format(i=3) + "\n"
    # whole-file documents and single lines too
    assert _kinds(_read(p, max_bytes=2000, sample_by="document")) == ["too_large"]
    assert _kinds(_read(p, max_bytes=2000, sample_by="line")) == ["ok", "too_large", "ok", "ok",
                                                                  "invalid_utf8", "ok", "ok"]


# --- a file that cannot be read to its end fails the stage ----------------------------------

def _good_lines(n: int, start: int = 0) -> bytes:
    return b"".join((json.dumps({"text": TEXT.format(i=start + i)}) + "\n").encode() for i in range(n))


def test_truncated_gzip_fails_naming_the_file_and_where_nothing_published(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.jsonl").write_bytes(_good_lines(50))
    full = gzip.compress(_good_lines(400, 1000))
    (raw / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    out = tmp_path / "out"
    with pytest.raises(InputDataError, match=r"cut\.jsonl\.gz: cannot be read past line \d+ \(byte \d+ .*"
                                             r"EOFError.*truncated or corrupt") as e:
        run(DataPrepConfig(validation_fraction=0.0, max_bad_fraction=0.9), {"raw": str(raw)}, str(out))
    assert "cannot be counted" in str(e.value)
    assert not out.exists() or not list(out.rglob("*.parquet"))
    assert not out.exists() or not list(out.rglob("*.parquet"))


# --- a leading UTF-8 BOM is ignored in every format -----------------------------------------

@pytest.mark.parametrize("name", ["a.jsonl", "a.txt", "a.jsonl.gz"])
def test_a_leading_bom_is_ignored(tmp_path: Path, name: str) -> None:
    docs = [TEXT.format(i=i) for i in range(3)]
    if ".txt" in name:
        data = "\n\n".join(docs).encode()
    elif name.startswith("a.jsonl"):
        data = _good_lines(3)
    else:
        data = json.dumps([{"text": d} for d in docs], indent=2).encode()
    p = tmp_path / name
    p.write_bytes(gzip.compress(BOM + data) if name.endswith(".gz") else BOM + data)
    recs = _read(p)
    assert _kinds(recs) == ["ok"] * 3
    assert [r.text.strip() for r in recs if r.text] == docs
    assert recs[0].where.endswith(f"(byte {3 + data.index(b'{') if '.json.' in name + '.' else 3})")


# --- names, sizes, wording -----------------------------------------------------------------

def test_suffixes_are_matched_in_any_case(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.GZ").write_bytes(gzip.compress(_good_lines(2)))
    (tmp_path / "b.JSONL").write_bytes(_good_lines(2))
    (tmp_path / "c.Parquet.Gz").write_bytes(b"")
    found = {Path(s.uri).name: s.format for s in resolve_sources(str(tmp_path))}
    assert found == {"a.jsonl.GZ": "jsonl", "b.JSONL": "jsonl", "c.Parquet.Gz": "parquet"}
    assert _kinds(_read(tmp_path / "a.jsonl.GZ")) == ["ok", "ok"]


def test_too_large_and_malformed_json_lines_are_reported_with_size_and_readable_wording(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    huge = (json.dumps({"text": "word " * 3000}) + "\n").encode()
    p.write_bytes(huge + b'{"text": "cut off\n' + _good_lines(1))
    recs = _read(p, max_bytes=2000)
    assert _kinds(recs) == ["too_large", "malformed_json", "ok"]
    assert recs[0].nbytes == len(huge) and str(len(huge)) in recs[0].detail
    assert recs[1].detail == "Unterminated string starting at: column 10"
