"""How each raw format is read (kubellm.data_prep.sources): documents kept or skipped whole, the size
limit in every format, JSON arrays streamed in bounded memory, a leading BOM ignored, and a file that
cannot be read to its end failing the stage (naming where it broke) instead of being counted as one
bad record."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubellm.core.errors import InputDataError
from kubellm.data_prep.config import DataPrepConfig
from kubellm.data_prep.readers import read_records
from kubellm.data_prep.records import Record
from kubellm.data_prep.sources import Source, resolve_sources
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


# --- parquet and JSON arrays: the size limit, non-string values -----------------------

def test_max_doc_bytes_applies_to_parquet_and_json_arrays(tmp_path: Path) -> None:
    docs = [TEXT.format(i=i) for i in range(6)]
    docs[2] = "word " * 2000
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in docs]))
    for name, where, nbytes in (("a.parquet", "row 2", 10000), ("b.json", "element 2 (byte ", 10012)):
        recs = _read(tmp_path / name, max_bytes=2000)
        assert _kinds(recs) == ["ok", "ok", "too_large", "ok", "ok", "ok"], name
        assert recs[2].where.startswith(f"{tmp_path / name}:{where}") and recs[2].nbytes == nbytes
        assert [r.text for r in recs if r.text] == docs[:2] + docs[3:]


def test_json_array_non_string_text_is_one_bad_record_others_unchanged(tmp_path: Path) -> None:
    items: list[dict[str, object]] = [{"text": TEXT.format(i=i)} for i in range(200)]
    items[17] = {"text": 17}
    items[30] = {"body": "no text here"}
    text = json.dumps(items, indent=1)
    (tmp_path / "arr.json").write_text(text)
    recs = _read(tmp_path / "arr.json")
    kinds = _kinds(recs)
    assert len(recs) == 200 and kinds[17] == "not_text" and kinds[30] == "missing_field"
    at = text.index('{\n  "text": 17')
    assert recs[17].where == f"{tmp_path / 'arr.json'}:element 17 (byte {at})"
    assert [r.text for r in recs if r.text] == [TEXT.format(i=i) for i in range(200) if i not in (17, 30)]
    # a byte that is not UTF-8 inside one element: that element is the bad record, named at the byte
    items[40] = {"text": "caf\udce9"}  # written as the raw byte 0xe9
    raw = json.dumps(items, ensure_ascii=False).encode("utf-8", "surrogateescape")
    (tmp_path / "arr.json").write_bytes(raw)
    recs = _read(tmp_path / "arr.json")
    assert _kinds(recs)[40] == "invalid_utf8" and recs[40].where.endswith(f"(byte {raw.index(b'caf') + 3})")
    assert _kinds(recs).count("ok") == 197


def test_parquet_without_the_text_column_fails_naming_it_and_the_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": [TEXT] * 50, "id": list(range(50))}), tmp_path / "a.parquet")
    with pytest.raises(InputDataError, match=r"a\.parquet: no column 'text' .*\['content', 'id'\]"):
        _read(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": list(range(5))}), tmp_path / "b.parquet")
    with pytest.raises(InputDataError, match=r"b\.parquet: column 'text' .* holds int64, expected strings"):
        _read(tmp_path / "b.parquet")


# --- JSON arrays stream ----------------------------------------------------------------------

def test_json_array_streams_in_bounded_memory(tmp_path: Path) -> None:
    """2 MB of ordinary elements and one 16 MB element, read with max_doc_bytes 1 MB: the file is never
    held whole (datasets' json builder loads it whole), nor is the gigantic element."""
    p = tmp_path / "big.json"
    with open(p, "w") as f:
        f.write("[\n")
        for i in range(1000):
            f.write(json.dumps({"text": TEXT.format(i=i) * 11, "meta": {"i": i, "tags": ["a", "]}"]}}) + ",\n")
        f.write('{"text": "' + 'a \\" quoted \\\\ word ' * ((16 << 20) // 20) + '"}\n]\n')
    assert p.stat().st_size > 17 << 20
    tracemalloc.start()
    try:
        n = bad = 0
        for r in read_records(resolve_sources(str(p))[0], p, field="text", max_bytes=1 << 20):
            n += 1
            bad += r.reason == "too_large"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert (n, bad) == (1001, 1)


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
    # the same for a JSON array cut short, and for one with a malformed element
    (raw / "cut.jsonl.gz").unlink()
    arr = json.dumps([{"text": TEXT.format(i=i)} for i in range(30)])
    (raw / "cut.json").write_text(arr[: len(arr) // 2])
    with pytest.raises(InputDataError, match=r"cut\.json: cannot be read past element 1\d \(byte \d+\): the file ends inside it"):
        run(DataPrepConfig(validation_fraction=0.0, max_bad_fraction=0.9), {"raw": str(raw)}, str(out))
    (raw / "cut.json").write_text(arr.replace("document 7 tells", 'document 7" tells "'))
    with pytest.raises(InputDataError, match=r"cut\.json: element 7 \(byte \d+\): malformed JSON"):
        run(DataPrepConfig(validation_fraction=0.0, max_bad_fraction=0.9), {"raw": str(raw)}, str(out))
    (raw / "cut.json").write_text(arr.replace("document 7 tells", 'document 7" tells'))  # quotes unbalanced
    with pytest.raises(InputDataError, match=r"cut\.json: .*element 7 \(byte \d+\)"):
        run(DataPrepConfig(validation_fraction=0.0, max_bad_fraction=0.9), {"raw": str(raw)}, str(out))
    assert not out.exists() or not list(out.rglob("*.parquet"))


def test_corrupt_parquet_fails_naming_the_row_where_it_broke(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [TEXT.format(i=i) for i in range(500)]}), p, row_group_size=100)
    col = pq.ParquetFile(p).metadata.row_group(3).column(0)
    at = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(p.read_bytes())
    data[at: at + 32] = b"\xff" * 32  # the page header of row group 3 (rows 300-399)
    p.write_bytes(bytes(data))
    with pytest.raises(InputDataError, match=r"a\.parquet: cannot be read past row 300 \(row group 3: rows "
                                             r"300-399 of 500; rows before 300 were read\)"):
        _read(p)
    p.write_bytes(bytes(data[: len(data) // 2]))  # no footer
    with pytest.raises(InputDataError, match=r"a\.parquet: cannot be read past its footer"):
        run(DataPrepConfig(max_bad_fraction=0.9), {"raw": str(p)}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("_manifest.json"))


def test_hub_stream_that_breaks_fails_naming_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def rows(*args: object, **kwargs: object) -> Iterator[dict[str, str]]:
        yield {"text": TEXT}
        yield {"text": "word " * 1000}
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset", rows)
    it = read_records(Source("hf:org/corpus", "hub", "hf:org/corpus"), None, field="text", max_bytes=2000)
    assert _kinds([next(it), next(it)]) == ["ok", "too_large"]
    with pytest.raises(InputDataError, match=r"hf:org/corpus: cannot be read past row 2 \(ConnectionError: "
                                             r"connection reset by peer\); the stream broke"):
        next(it)


# --- a leading UTF-8 BOM is ignored in every format -----------------------------------------

@pytest.mark.parametrize("name", ["a.jsonl", "a.txt", "a.json", "a.jsonl.gz", "a.json.gz"])
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


@pytest.mark.parametrize("name", ["a.jsonl", "a.json"])
def test_json_python_will_not_build_is_one_bad_record_not_a_stage_failure(tmp_path: Path, name: str) -> None:
    """An integer past Python's 4300-digit limit or nesting past the recursion limit is well-formed
    JSON that `json.loads` refuses with ValueError / RecursionError: one bad record naming where, the
    records around it kept."""
    big = '{"text": "a record", "id": ' + "1" * 5000 + "}"
    deep = "[" * 200_000 + "]" * 200_000
    good = json.dumps({"text": TEXT.format(i=0)})
    items = [good, big, deep, good]
    p = tmp_path / name
    p.write_text("\n".join(items) + "\n" if name.endswith(".jsonl") else "[" + ",\n".join(items) + "]")
    recs = _read(p)
    assert _kinds(recs) == ["ok", "malformed_json", "malformed_json", "ok"]
    assert "4300 digits" in recs[1].detail and recs[2].detail == "nested too deeply to parse"
    assert recs[1].where.endswith(f"line 2 (byte {len(good) + 1})" if name.endswith(".jsonl")
                                  else f"element 1 (byte {len(good) + 3})")


def test_a_bom_at_the_start_of_any_line_is_ignored(tmp_path: Path) -> None:
    """`cat a.jsonl b.jsonl` of two files each written with a BOM: the second BOM is not a bad record."""
    p = tmp_path / "cat.jsonl"
    p.write_bytes(BOM + _good_lines(2) + BOM + _good_lines(1))
    assert _kinds(_read(p)) == ["ok", "ok", "ok"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_json_array_elements_read_in_chunks_equal_json_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             chunk: int) -> None:
    """The chunked element scanner against `json.loads` of the whole array: strings with escaped quotes,
    backslashes, brackets and braces, unicode (2-4 byte UTF-8 and \\u escapes), nested objects and
    arrays and scalars beside the text, every chunk boundary landing in every kind of place."""
    import random

    import kubellm.data_prep.json_array as json_array

    monkeypatch.setattr(json_array, "_CHUNK", chunk)
    rng = random.Random(chunk)
    pieces = ['\\"', "\\\\", "[", "]", "{", "}", ",", ":", " ", "\n", "é", "日本", "\U0001f600", "a\\", "x"]
    items = []
    for i in range(40):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) + f" doc {i} " + TEXT[:40]
        items.append({"id": i, "meta": {"tags": ["a]", "{b", [1, 2.5, None, True]], "q": '"}'},
                      "text": text, "score": -1.5e-3})
    for name, dumped in (("ascii", json.dumps(items)), ("utf8", json.dumps(items, ensure_ascii=False)),
                         ("indented", json.dumps(items, indent=2, ensure_ascii=False))):
        p = tmp_path / f"{name}.json"
        p.write_text(dumped, encoding="utf-8")
        recs = _read(p)
        assert _kinds(recs) == ["ok"] * len(items), name
        assert [r.text for r in recs] == [x["text"] for x in json.loads(p.read_text(encoding="utf-8"))], name


def test_a_hub_source_is_pinned_to_the_commit_it_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint names the hub commit and the reader reads that commit: a dataset updated on the
    hub under the same name is a new input (its name alone had been the fingerprint: a stale reuse)."""
    import types

    import datasets
    import huggingface_hub

    from kubellm.data_prep.sources import hub_source, parse_hub

    head = {"sha": "a" * 40}
    asked = []

    def dataset_info(self: object, name: str, revision: str | None = None, **kw: object) -> object:
        asked.append((name, revision))
        return types.SimpleNamespace(sha=head["sha"])

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    src = hub_source("hf:org/corpus:en")
    assert src.uri == "hf:org/corpus:en" and src.fingerprint == f"hf:org/corpus:en@{'a' * 40}"
    head["sha"] = "b" * 40  # pushed to the hub since
    assert hub_source("hf:org/corpus:en").fingerprint != src.fingerprint
    assert hub_source("hf:org/corpus@v2").fingerprint == f"hf:org/corpus@{'b' * 40}" and asked[-1] == ("org/corpus", "v2")
    assert parse_hub("hf:org/corpus:en@v2") == ("org/corpus", "en", "v2")

    loads = []

    def load_dataset(name: str, config: str | None = None, **kw: object) -> Iterator[dict[str, str]]:
        loads.append((name, config, kw.get("revision")))
        return iter([{"text": TEXT}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert _kinds(list(read_records(src, None, field="text", max_bytes=2000))) == ["ok"]
    assert loads == [("org/corpus", "en", "a" * 40)]  # the listed commit, not the hub's head now
    # offline: unpinned, read as named
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub_source("hf:org/corpus:en").fingerprint == "hf:org/corpus:en"


def test_a_file_that_two_input_items_name_is_read_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "data/sub").mkdir(parents=True)
    for name in ("a.jsonl", "sub/b.jsonl"):
        (tmp_path / "data" / name).write_bytes(_good_lines(1))
    raw = f"{tmp_path}/data,{tmp_path}/data/a.jsonl,{tmp_path}/data/../data/sub/*.jsonl"
    with caplog.at_level("WARNING"):
        found = [Path(s.uri).name for s in resolve_sources(raw)]
    assert found == ["a.jsonl", "b.jsonl"]
    assert "already named by an earlier input item are read once" in caplog.text


def test_a_utf16_file_or_one_that_is_not_json_lines_fails_naming_it(tmp_path: Path) -> None:
    """Every line of such a file is a bad record: under 1% of a large input it vanished with a warning."""
    for codec in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"):
        p = tmp_path / "wide.jsonl"
        p.write_bytes(("\ufeff" + json.dumps({"text": "hello"})).encode(codec))  # with its byte-order mark
        with pytest.raises(InputDataError, match=r"wide\.jsonl: starts with a UTF-16/UTF-32 byte-order mark"):
            _read(p)
    p = tmp_path / "pretty.json"
    p.write_text(json.dumps({"text": "hello", "meta": {"a": 1}}, indent=2))
    with pytest.raises(InputDataError, match=r"pretty\.json: none of its 6 lines is JSON \(first: line 1: "
                                             r"malformed_json: Expecting .*\); expected JSON Lines"):
        _read(p)
    p.write_text(json.dumps({"text": "hello"}) + "\n{broken\n")  # one bad line among good ones: a bad record
    assert _kinds(_read(p)) == ["ok", "malformed_json"]


def test_two_revisions_of_a_hub_dataset_are_two_inputs() -> None:
    """The duplicate check keys local and S3 files by what they are, a hub dataset by name and revision:
    `hf:ds@v1,hf:ds@v2` had been read once."""
    from kubellm.data_prep.sources import scan_sources

    found = [s.uri for s in scan_sources("hf:org/ds@v1,hf:org/ds@v2,hf:org/ds@v1", warn=False).sources]
    assert found == ["hf:org/ds@v1", "hf:org/ds@v2"]
