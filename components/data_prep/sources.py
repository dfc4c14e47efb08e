"""Raw sources for data prep: resolve what `--input raw=...` names, and stream its records.

A raw input is a comma-separated list of any of:
  * a local file, directory (searched recursively) or glob (`data/**/*.jsonl.gz`)
  * an `s3://bucket/prefix` (every object under it) or `s3://bucket/key` (one object) — staged
    through kubellm's storage layer (`storage_for(uri).download`) into a temp dir, one shard at a
    time; never `datasets`' s3fs path (its aiobotocore pin fights boto3's)
  * `hf:<name>[:<config>]` — a Hugging Face Hub dataset streamed with
    `datasets.load_dataset(name, config, split=..., streaming=True)` (needs a network)

Formats by suffix, any case (optionally `.gz`): `.jsonl`/`.ndjson`/`.json` (JSON lines, or one JSON
array for `.json`), `.parquet`, `.txt`/`.text`/`.md`. A leading UTF-8 byte-order mark is ignored in JSON
lines and text.

How each is read, and why:
  * JSON lines and text are read **here, line by line**: each line is decoded and parsed on its own so
    that one bad line (invalid UTF-8, a lone surrogate, a malformed JSON line, a NUL byte, a gigantic
    record) is skipped and reported with its file, line and byte offset; `datasets`' json/text
    builders abort the whole file on the first such line and cannot say where. In text files a
    document (line, paragraph or whole file, `text_sample_by`) with a bad line in it, or bigger than
    `max_doc_bytes`, is skipped whole as one bad record: no part of it is kept.
  * Parquet, JSON arrays and hub datasets go through `datasets.load_dataset(..., streaming=True)`;
    an unreadable parquet file (e.g. a truncated footer) is reported as one bad record naming the file
    and the row it stopped at.

A JSON-lines or text file that cannot be read to its end (a truncated or corrupt gzip) raises
`InputDataError` naming the file and where it broke: the records after that point cannot be
counted, so it is never a skipped bad record.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.storage import is_s3, storage_for

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
           ".txt": "text", ".text": "text", ".md": "text"}
HUB_SCHEME = "hf:"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, ignored at the start of any file


@dataclasses.dataclass(frozen=True)
class Source:
    """One input shard: a file (local or S3) or a hub dataset. `fingerprint` changes with content."""

    uri: str
    format: str
    fingerprint: str


@dataclasses.dataclass
class Record:
    """One document read from a source, or a bad record (`text` None, `reason` set)."""

    text: str | None
    where: str                  # "file:line 12 (byte 345)" or "file:row 7"
    nbytes: int
    reason: str | None = None   # bad-record kind: invalid_utf8, lone_surrogate, nul_byte, empty, ...
    detail: str = ""


def format_of(name: str) -> str | None:
    """The format a file name's suffix says (any case, optionally `.gz`), or None."""
    name = name.lower()
    return FORMATS.get(Path(name.removesuffix(".gz")).suffix)


def resolve_sources(raw: str) -> list[Source]:
    """Expand the raw input into an ordered list of shards (sorted within each item)."""
    out: list[Source] = []
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        if item.startswith(HUB_SCHEME):
            out.append(Source(item, "hub", item))
        elif is_s3(item):
            st = storage_for(item)
            objs = [o for o in st.list(item) if format_of(o.relpath)]
            if not objs and format_of(item):  # one object, not a prefix
                objs = [o for o in st.list(item.rsplit("/", 1)[0]) if o.uri == item]
            if not objs:
                raise InputDataError(f"{item}: no readable objects under this S3 prefix "
                                     f"(expected suffixes {sorted(FORMATS)}, optionally .gz)")
            out += [Source(o.uri, format_of(o.relpath) or "", f"{o.uri}@{o.etag}:{o.size}") for o in objs]
        else:
            p = Path(item)
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and format_of(f.name)
                               and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
            elif p.is_file():
                files = [p]
            else:
                files = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not files:
                raise InputDataError(f"{item}: no such file, directory or glob match "
                                     f"(expected suffixes {sorted(FORMATS)}, optionally .gz)")
            for f in files:
                fmt = format_of(f.name)
                if fmt is None:
                    raise ConfigError(f"{f}: unknown format; expected one of {sorted(FORMATS)} "
                                      "(optionally .gz)")
                st = f.stat()
                out.append(Source(str(f), fmt, f"{f.resolve()}@{st.st_size}:{st.st_mtime_ns}"))
    if not out:
        raise ConfigError(f"raw input {raw!r} names no sources")
    return out


def stage_local(source: Source, tmp_dir: Path) -> Path:
    """A local path for the source: S3 objects are downloaded through kubellm's storage layer."""
    if not is_s3(source.uri):
        return Path(source.uri)
    dest = tmp_dir / Path(source.uri.split("://", 1)[1]).name
    storage_for(source.uri).download(source.uri, dest)
    return dest


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_binary(path: Path) -> Any:
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


# What a broken file raises while it is read (gzip, zlib, the OS); pyarrow raises ArrowException/OSError.
_READ_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, OSError)


def _unreadable(label: str, where: str, e: BaseException, what: str = "the file is truncated or corrupt"
                ) -> InputDataError:
    msg = str(e).splitlines()[0] if str(e) else ""
    return InputDataError(
        f"{label}: cannot be read past {where} ({type(e).__name__}: {msg[:200]}); {what}, and the "
        "records after that point cannot be counted, so they are not skipped as bad records. Re-create "
        "or re-download it, or leave it out of the input.")


def _too_large(nbytes: int, max_bytes: int) -> str:
    return f"too_large: {nbytes} bytes, more than data_prep.max_doc_bytes={max_bytes}"


def _lines(path: Path, label: str, max_bytes: int) -> Iterator[tuple[int, int, bytes | None, int]]:
    """Yield (line_no, byte_offset, line, nbytes) without ever holding more than `max_bytes` + 1 of
    one line; `line` is None for a line longer than `max_bytes` (`nbytes` is then its whole size).
    A leading UTF-8 BOM is not part of line 1. A file that cannot be read to its end (a truncated or
    corrupt gzip) raises InputDataError naming the line and byte where it broke."""
    offset, line_no = 0, 0
    with _open_binary(path) as f:
        while True:
            try:
                line = f.readline(max_bytes + 1)
            except _READ_ERRORS as e:
                raise _unreadable(label, f"line {line_no} (byte {offset} of its uncompressed data)", e) from e
            if not line:
                return
            line_no += 1
            start = offset
            offset += len(line)
            if len(line) > max_bytes and not line.endswith(b"\n"):
                # Skip the rest of the gigantic line in bounded chunks.
                try:
                    while True:
                        chunk = f.readline(1 << 20)
                        offset += len(chunk)
                        if not chunk or chunk.endswith(b"\n"):
                            break
                except _READ_ERRORS as e:
                    raise _unreadable(label, f"byte {offset} (inside line {line_no}, uncompressed)", e) from e
                yield line_no, start, None, offset - start
                continue
            if line_no == 1 and line.startswith(_BOM):
                line, start = line[len(_BOM):], start + len(_BOM)
            yield line_no, start, line, len(line)



def _check_text(text: Any, field: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a decoded value."""
    if not isinstance(text, str):
        return None, "missing_field" if text is None else "not_text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, "lone_surrogate"
    if "\x00" in text:
        return None, "nul_byte"
    if not text.strip():
        return None, "empty"
    return text, None


def _bad(where: str, n: int, reason: str) -> Record:
    kind, _, detail = reason.partition(": ")
    return Record(None, where, n, kind, detail)


def _object_record(obj: Any, where: str, nbytes: int, field: str) -> Record:
    """The record for one parsed JSON value (a JSON line or an element of a JSON array)."""
    if not isinstance(obj, dict):
        return _bad(where, nbytes, f"not_text: expected a JSON object, got {type(obj).__name__}")
    text, reason = _check_text(obj.get(field), field)
    if reason:
        detail = f"no string field {field!r}" if reason in ("missing_field", "not_text") else ""
        return _bad(where, nbytes, f"{reason}: {detail}" if detail else reason)
    return Record(text, where, nbytes)


def _jsonl(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    for line_no, offset, line, nbytes in _lines(path, label, max_bytes):
        where = f"{label}:line {line_no} (byte {offset})"
        if line is None:
            yield _bad(where, nbytes, _too_large(nbytes, max_bytes))
            continue
        if not line.strip():
            continue  # blank lines between JSON records are not records
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _bad(f"{label}:line {line_no} (byte {offset + e.start})", nbytes,
                       f"invalid_utf8: {e.reason}")
            continue
        try:
            obj = json.loads(s.rstrip("\r\n"))  # a line cut off inside a string: "Unterminated string"
        except json.JSONDecodeError as e:
            yield _bad(where, nbytes, f"malformed_json: {e.msg}: column {e.colno}")
            continue
        yield _object_record(obj, where, nbytes, field)


def _text(path: Path, label: str, sample_by: str, max_bytes: int) -> Iterator[Record]:
    """Documents of a text file: each line, blank-line separated paragraphs, or the whole file.

    A document is kept or skipped whole: one with a line that is not UTF-8 (or longer than
    `max_bytes`), or bigger than `max_bytes` in all, is one bad record naming where it starts (the bad
    byte, for invalid UTF-8) and its full size; it is not buffered past `max_bytes`."""
    parts: list[str] = []
    start, size = "", 0
    problem: tuple[str, str] | None = None  # (where, reason) of the first thing wrong with the document

    def end_document() -> Iterator[Record]:
        nonlocal start, size, problem
        if start:
            if problem is not None and problem[1] == "too_large":
                yield _bad(start, size, _too_large(size, max_bytes))
            elif problem is not None:
                yield _bad(problem[0], size, problem[1])
            else:
                text = "".join(parts)
                ok, reason = _check_text(text.rstrip("\r\n") if sample_by == "line" else text, "text")
                yield Record(ok, start, size) if reason is None else _bad(start, size, reason)
        parts.clear()
        start, size, problem = "", 0, None

    for line_no, offset, line, nbytes in _lines(path, label, max_bytes):
        s: str | None = None
        line_problem: tuple[str, str] | None = None
        if line is None:
            line_problem = ("", "too_large")
        else:
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                line_problem = (f"{label}:line {line_no} (byte {offset + e.start})", f"invalid_utf8: {e.reason}")
        if s is not None and not s.strip() and sample_by != "document":
            yield from end_document()  # a blank line ends a paragraph; in line mode it is no document
            continue
        if not start:
            start = f"{label}:line {line_no} (byte {offset})"
        size += nbytes
        if problem is None:
            problem = line_problem or (("", "too_large") if size > max_bytes else None)
        if problem is None:
            assert s is not None
            parts.append(s)
        else:
            parts.clear()  # skipped whole: stop buffering it, but read on to its end
        if sample_by == "line":
            yield from end_document()
    yield from end_document()


def _via_datasets(builder: str, data_files: str | None, label: str, field: str,
                  config_name: str | None = None, split: str = "train") -> Iterator[Record]:
    import datasets

    row = 0
    try:
        if data_files is None:
            ds = datasets.load_dataset(builder, config_name, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True)
        for row, obj in enumerate(ds):  # noqa: B007 - `row` names where a failure happened
            where = f"{label}:row {row}"
            text, reason = _check_text(obj.get(field), field)
            size = len(text.encode("utf-8")) if text else 0
            yield Record(text, where, size) if reason is None else _bad(where, 0, reason)
    except Exception as e:  # pyarrow/datasets raise many types for a corrupt file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        yield _bad(f"{label}:row {row}", 0, f"unreadable_file: {type(e).__name__}: {msg[:200]}")


def read_records(source: Source, local: Path | None, *, field: str, max_bytes: int,
                 sample_by: str = "paragraph", hub_split: str = "train") -> Iterator[Record]:
    """Stream the records of one source (local = its staged local path; None for hub sources)."""
    label = source.uri
    if source.format == "hub":
        spec = source.uri[len(HUB_SCHEME):]
        name, _, cfg = spec.partition(":")
        yield from _via_datasets(name, None, label, field, config_name=cfg or None, split=hub_split)
        return
    assert local is not None
    if source.format == "parquet":
        yield from _via_datasets("parquet", str(local), label, field)
    elif source.format == "text":
        yield from _text(local, label, sample_by, max_bytes)
    elif source.format == "json" and _is_json_array(local):
        yield from _via_datasets("json", str(local), label, field)
    else:
        yield from _jsonl(local, label, field, max_bytes)


def _is_json_array(path: Path) -> bool:
    try:
        with _open_binary(path) as f:
            head = f.read(4096).lstrip()
    except _READ_ERRORS:
        return False
    return head.startswith(b"[")
