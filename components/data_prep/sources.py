"""Raw sources for data prep: resolve what `--input raw=...` names, and stream its records.

A raw input is a comma-separated list of any of:
  * a local file, directory (searched recursively) or glob (`data/**/*.jsonl.gz`)
  * an `s3://bucket/prefix` (every object under it) or `s3://bucket/key` (one object) — staged
    through kubellm's storage layer (`storage_for(uri).download`) into a temp dir, one shard at a
    time; never `datasets`' s3fs path (its aiobotocore pin fights boto3's)
  * `hf:<name>[:<config>]` — a Hugging Face Hub dataset streamed with
    `datasets.load_dataset(name, config, split=..., streaming=True)` (needs a network)

Formats by suffix, any case (optionally `.gz`): `.jsonl`/`.ndjson`/`.json` (JSON lines, or one JSON
array for `.json`), `.parquet`, `.txt`/`.text`/`.md`. A leading UTF-8 byte-order mark is ignored.

How each is read, and why — every reader streams, holding one record (at most `max_doc_bytes`) plus
one read chunk or batch:
  * JSON lines and text are read **here, line by line**: each line is decoded and parsed on its own so
    that one bad line (invalid UTF-8, a lone surrogate, a malformed JSON line, a NUL byte, a gigantic
    record) is skipped and reported with its file, line and byte offset; `datasets`' json/text
    builders abort the whole file on the first such line and cannot say where. In text files a
    document (line, paragraph or whole file, `text_sample_by`) with a bad line in it, or bigger than
    `max_doc_bytes`, is skipped whole as one bad record: no part of it is kept.
  * JSON arrays are read **here, a chunk at a time**: the extent of each element is found (strings,
    escapes and nesting only) and the element is parsed by `json`; `datasets` loads a JSON array
    whole into memory and JSON-encodes a whole column when one value is not a string. An element
    larger than `max_doc_bytes` is skipped without being held. A malformed element is a hard error:
    past it the array's structure cannot be trusted, so what is lost could not be counted.
  * Parquet is read with `pyarrow.parquet.ParquetFile.iter_batches` over the text column only; a
    missing or non-string text column fails at once, naming the columns present.
  * Hub datasets stream through `datasets.load_dataset(..., streaming=True)`.

A file that cannot be read to its end (a truncated or corrupt gzip, a parquet file without its footer
or with a corrupt page, a hub stream that breaks) raises `InputDataError` naming the file and where it
broke: the records after that point cannot be counted, so it is never a skipped bad record.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob
import gzip
import json
import logging
import re
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
_BOM = codecs.BOM_UTF8  # a UTF-8 byte-order mark, ignored at the start of any file


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


# --- JSON arrays: one element at a time ----------------------------------------------------------

_CHUNK = 1 << 16
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # up to the closing quote, escapes and all
_STRUCTURE = re.compile(r'["\[\]{}]')
_SCALAR_END = re.compile(r"[\s,\]]")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, decoded with surrogateescape


def _utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogateescape"))


class _Chars:
    """The text of a (possibly gzipped) file, a chunk at a time: `buf[pos:]` is what is not consumed
    yet, `offset` the byte offset of `buf[pos]` in the file. Bytes that are not UTF-8 decode to
    U+DC80..U+DCFF (surrogateescape), so the JSON structure around them survives and the element holding
    them is reported as invalid_utf8."""

    def __init__(self, f: Any, label: str) -> None:
        self.f, self.label = f, label
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.offset, self.read_bytes = "", 0, 0, 0

    def more(self) -> int | None:
        """Read the next chunk, dropping the consumed text: returns how far indexes into `buf` moved
        back, or None at the end of the file."""
        try:
            data = self.f.read(_CHUNK)
        except _READ_ERRORS as e:
            raise _unreadable(self.label, f"byte {self.read_bytes} (of its uncompressed data)", e) from e
        self.read_bytes += len(data)
        new = self.decoder.decode(data, final=not data)
        if not data and not new:
            return None
        shift = self.pos
        self.buf, self.pos = self.buf[shift:] + new, 0
        return shift

    def peek(self) -> str:
        """The next character that is not JSON whitespace ("" at the end of the file), not consumed."""
        while True:
            m = _WHITESPACE.match(self.buf, self.pos)
            end = m.end() if m else self.pos
            self.offset += end - self.pos  # JSON whitespace is ASCII
            self.pos = end
            if end < len(self.buf):
                return self.buf[end]
            if self.more() is None:
                return ""

    def take(self, n: int = 1) -> None:
        self.offset += _utf8_len(self.buf[self.pos:self.pos + n])
        self.pos += n


class _Extent:
    """Finds where one JSON value ends, fed a chunk at a time: only strings, escapes and nesting are
    followed (json parses the value itself). A value that is not an object, array or string ends at the
    next whitespace, comma or bracket."""

    def __init__(self, first: str) -> None:
        self.scalar = first not in '{["'
        self.depth, self.in_string, self.escaped = 0, False, False

    def feed(self, s: str, i: int) -> int:
        """Index just past the value's end in `s`, scanning from `i`; -1 when it ends further on."""
        if self.scalar:
            m = _SCALAR_END.search(s, i)
            return m.start() if m else -1
        if self.escaped:
            if i >= len(s):
                return -1
            i, self.escaped = i + 1, False
        while True:
            if self.in_string:
                body = _STRING_BODY.match(s, i)
                i = body.end() if body else i
                if i >= len(s):
                    return -1
                if s[i] == "\\":  # the last character: what it escapes comes in the next chunk
                    self.escaped = True
                    return -1
                i += 1  # the closing quote
                self.in_string = False
                if self.depth == 0:
                    return i
                continue
            m = _STRUCTURE.search(s, i)
            if m is None:
                return -1
            c, i = m.group(), m.end()
            if c == '"':
                self.in_string = True
            elif c in "[{":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return i


def _json_value(src: _Chars, max_bytes: int, where: str) -> tuple[str | None, int]:
    """Consume the JSON value at `src.pos`: (its text, its size in bytes). The text is None when the
    value is bigger than `max_bytes`: it is then skipped a chunk at a time, never held whole."""
    extent = _Extent(src.buf[src.pos])
    i, size, dropped = src.pos, 0, False
    while (end := extent.feed(src.buf, i)) < 0:
        size += _utf8_len(src.buf[i:])
        i = len(src.buf)
        if size > max_bytes:
            dropped, src.pos = True, i  # let the next read drop what was scanned
        shift = src.more()
        if shift is None:
            raise _unreadable(src.label, f"{where}: the file ends inside it",
                              EOFError("unterminated JSON array element"))
        i -= shift
    size += _utf8_len(src.buf[i:end])
    text = None if dropped or size > max_bytes else src.buf[src.pos:end]
    src.pos, src.offset = end, src.offset + size
    return text, size


def _json_array(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    """The elements of a file holding one JSON array, streamed in bounded memory."""

    def broken(where: str, what: str) -> InputDataError:
        return InputDataError(f"{label}: {where}: {what}; past it the array cannot be read reliably, "
                              "so the file is not used (fix it, or write it as JSON lines, where one bad "
                              "line is skipped and counted)")

    with _open_binary(path) as f:
        src = _Chars(f, label)
        if src.peek() == "\ufeff":
            src.take()
        if src.peek() != "[":
            raise broken(f"byte {src.offset}", "expected '[' to start the JSON array")
        src.take()
        index = 0
        while True:
            c = src.peek()
            if c == "]":
                src.take()
                if src.peek():
                    raise broken(f"byte {src.offset}", "unexpected data after the closing ']'")
                return
            if index:
                if c != ",":
                    raise broken(f"byte {src.offset}", f"expected ',' or ']' after element {index - 1}, "
                                                       f"found {c!r}" if c else "the file ends inside the array")
                src.take()
                c = src.peek()
            if not c or c in ",]":
                raise broken(f"byte {src.offset}", f"expected element {index}, found {c!r}" if c
                             else "the file ends inside the array")
            start = src.offset
            where = f"{label}:element {index} (byte {start})"
            text, size = _json_value(src, max_bytes, f"element {index} (byte {start})")
            index += 1
            if text is None:
                yield _bad(where, size, _too_large(size, max_bytes))
                continue
            if m := _ESCAPED_BYTE.search(text):
                yield _bad(f"{label}:element {index - 1} (byte {start + _utf8_len(text[:m.start()])})", size,
                           "invalid_utf8: not UTF-8")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise broken(f"element {index - 1} (byte {start})", f"malformed JSON ({e.msg}: char {e.pos} "
                             "of the element)") from e
            yield _object_record(obj, where, size, field)


# --- Parquet and hub datasets ------------------------------------------------------------------

_PARQUET_BATCH = 256  # rows per batch: memory is a batch of the text column


def _value_record(value: Any, where: str, field: str, max_bytes: int) -> Record:
    """The record for one text value from parquet (bytes or None) or a hub dataset (any)."""
    if isinstance(value, bytes):
        if len(value) > max_bytes:
            return _bad(where, len(value), _too_large(len(value), max_bytes))
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return _bad(f"{where} (byte {e.start} of the value)", len(value), f"invalid_utf8: {e.reason}")
    text, reason = _check_text(value, field)
    if reason is not None:
        detail = f"no string field {field!r}" if reason in ("missing_field", "not_text") else ""
        return _bad(where, 0, f"{reason}: {detail}" if detail else reason)
    assert text is not None
    nbytes = len(text.encode("utf-8"))
    if nbytes > max_bytes:
        return _bad(where, nbytes, _too_large(nbytes, max_bytes))
    return Record(text, where, nbytes)


def _parquet(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        f = stack.enter_context(gzip.open(path, "rb")) if _is_gzip(path) else path
        try:
            pf = stack.enter_context(pq.ParquetFile(f))
        except (pa.ArrowException, *_READ_ERRORS) as e:
            raise _unreadable(label, "its footer (not a readable parquet file)", e) from e
        schema = pf.schema_arrow
        if field not in schema.names:
            raise InputDataError(f"{label}: no column {field!r} (data_prep.text_field); the columns are "
                                 f"{schema.names}")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            raise InputDataError(f"{label}: column {field!r} (data_prep.text_field) holds {kind}, "
                                 "expected strings")
        total, row = pf.metadata.num_rows, 0
        for group in range(pf.num_row_groups):
            first = row
            batches = pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group], columns=[field])
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, *_READ_ERRORS) as e:
                    rows = pf.metadata.row_group(group).num_rows
                    raise _unreadable(label, f"row {row} (row group {group}: rows {first}-{first + rows - 1} "
                                      f"of {total}; rows before {row} were read)", e) from e
                col = batch.column(0)
                # the values as UTF-8 bytes, decoded per row so that bad bytes are one bad record
                values = (col.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
                          if pa.types.is_string(kind) or pa.types.is_large_string(kind) else col).to_pylist()
                for value in values:
                    yield _value_record(value, f"{label}:row {row}", field, max_bytes)
                    row += 1
        if row != total:
            raise InputDataError(f"{label}: {row} rows read, but its footer says {total}; the file is corrupt")


def _hub(name: str, config_name: str | None, split: str, label: str, field: str,
         max_bytes: int) -> Iterator[Record]:
    import datasets

    row = 0
    try:
        rows = iter(datasets.load_dataset(name, config_name, split=split, streaming=True))
    except Exception as e:  # datasets/huggingface_hub raise many types (network, missing dataset)
        raise InputDataError(f"{label}: cannot open the hub dataset (split {split!r}): "
                             f"{type(e).__name__}: {str(e)[:300]}") from e
    while True:
        try:
            obj = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a stream that breaks part way: the rest cannot be counted
            raise _unreadable(label, f"row {row}", e, "the stream broke") from e
        yield _value_record(obj.get(field), f"{label}:row {row}", field, max_bytes)
        row += 1


def read_records(source: Source, local: Path | None, *, field: str, max_bytes: int,
                 sample_by: str = "paragraph", hub_split: str = "train") -> Iterator[Record]:
    """Stream the records of one source (local = its staged local path; None for hub sources)."""
    label = source.uri
    if source.format == "hub":
        spec = source.uri[len(HUB_SCHEME):]
        name, _, cfg = spec.partition(":")
        yield from _hub(name, cfg or None, hub_split, label, field, max_bytes)
        return
    assert local is not None
    if source.format == "parquet":
        yield from _parquet(local, label, field, max_bytes)
    elif source.format == "text":
        yield from _text(local, label, sample_by, max_bytes)
    elif source.format == "json" and _is_json_array(local):
        yield from _json_array(local, label, field, max_bytes)
    else:
        yield from _jsonl(local, label, field, max_bytes)


def _is_json_array(path: Path) -> bool:
    try:
        with _open_binary(path) as f:
            head = f.read(4096)
    except _READ_ERRORS:
        return False  # read as JSON lines, which names where the file broke
    return head.removeprefix(_BOM).lstrip().startswith(b"[")
