"""Raw sources for data prep: resolve what `--input raw=...` names, and stream its records.

A raw input is a comma-separated list of any of:
  * a local file, directory (searched recursively) or glob (`data/**/*.jsonl.gz`)
  * an `s3://bucket/prefix` (every object under it) or `s3://bucket/key` (one object) — staged
    through kubellm's storage layer (`storage_for(uri).download`) into a temp dir, one shard at a
    time; never `datasets`' s3fs path (its aiobotocore pin fights boto3's)
  * `hf:<name>[:<config>]` — a Hugging Face Hub dataset streamed with
    `datasets.load_dataset(name, config, split=..., streaming=True)` (needs a network)

Formats by suffix (optionally `.gz`): `.jsonl`/`.ndjson`/`.json` (JSON lines, or one JSON array for
`.json`), `.parquet`, `.txt`/`.text`/`.md`.

How each is read, and why: JSON lines and text are read **here, streaming, line by line** — each
line is decoded and parsed on its own so that one bad line (invalid UTF-8, a lone surrogate, a
malformed JSON line, a NUL byte, a gigantic record, a truncated gzip) is skipped and reported with
its file, line and byte offset; `datasets`' json/text builders abort the whole file on the first
such line and cannot say where. Parquet, JSON arrays and hub datasets go through
`datasets.load_dataset(..., streaming=True)`; an unreadable file (e.g. a truncated parquet footer)
is reported as one bad record naming the file and the row it stopped at.
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
    base = name[:-3] if name.endswith(".gz") else name
    return FORMATS.get(Path(base).suffix.lower())


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


def _open_binary(path: Path) -> Any:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _lines(path: Path, label: str, max_bytes: int) -> Iterator[tuple[int, int, bytes | None, str | None]]:
    """Yield (line_no, byte_offset, line, problem) without ever holding more than `max_bytes` + 1 of
    one line; a truncated/corrupt gzip ends the stream with problem `truncated_file`."""
    offset, line_no = 0, 0
    with _open_binary(path) as f:
        while True:
            try:
                line = f.readline(max_bytes + 1)
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
                yield line_no + 1, offset, None, f"truncated_file: {type(e).__name__}: {e}"
                return
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
                except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
                    yield line_no, start, None, f"truncated_file: {type(e).__name__}: {e}"
                    return
                yield line_no, start, None, f"too_large: more than {max_bytes} bytes"
                continue
            yield line_no, start, line, None


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


def _jsonl(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    for line_no, offset, line, problem in _lines(path, label, max_bytes):
        where = f"{label}:line {line_no} (byte {offset})"
        if problem is not None:
            yield _bad(where, 0, problem)
            continue
        assert line is not None
        if not line.strip():
            continue  # blank lines between JSON records are not records
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _bad(f"{label}:line {line_no} (byte {offset + e.start})", len(line),
                       f"invalid_utf8: {e.reason}")
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            yield _bad(where, len(line), f"malformed_json: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield _bad(where, len(line), f"not_text: expected a JSON object, got {type(obj).__name__}")
            continue
        text, reason = _check_text(obj.get(field), field)
        if reason:
            detail = f"no string field {field!r}" if reason in ("missing_field", "not_text") else ""
            yield _bad(where, len(line), f"{reason}: {detail}" if detail else reason)
        else:
            yield Record(text, where, len(line))


def _text(path: Path, label: str, sample_by: str, max_bytes: int) -> Iterator[Record]:
    buf: list[str] = []
    buf_start, buf_bytes = (1, 0), 0

    def flush() -> Iterator[Record]:
        nonlocal buf, buf_bytes
        if buf:
            text = "".join(buf)
            where = f"{label}:line {buf_start[0]} (byte {buf_start[1]})"
            if buf_bytes > max_bytes:
                yield _bad(where, buf_bytes, f"too_large: more than {max_bytes} bytes")
            else:
                ok, reason = _check_text(text, "text")
                yield Record(ok, where, buf_bytes) if reason is None else _bad(where, buf_bytes, reason)
        buf, buf_bytes = [], 0

    for line_no, offset, line, problem in _lines(path, label, max_bytes):
        where = f"{label}:line {line_no} (byte {offset})"
        if problem is not None:
            yield from flush()
            yield _bad(where, 0, problem)
            continue
        assert line is not None
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield from flush()
            yield _bad(f"{label}:line {line_no} (byte {offset + e.start})", len(line),
                       f"invalid_utf8: {e.reason}")
            continue
        if sample_by == "line":
            stripped = s.rstrip("\r\n")
            if stripped.strip():
                text, reason = _check_text(stripped, "text")
                yield Record(text, where, len(line)) if reason is None else _bad(where, len(line), reason)
            continue
        if sample_by == "paragraph" and not s.strip():
            yield from flush()
            continue
        if not buf:
            buf_start = (line_no, offset)
        buf.append(s)
        buf_bytes += len(line)
        if buf_bytes > max_bytes:  # a gigantic paragraph/document: stop buffering it
            yield from flush()
    yield from flush()


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
    except (EOFError, OSError, zlib.error):
        return False
    return head.startswith(b"[")
