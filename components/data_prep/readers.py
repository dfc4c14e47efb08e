"""Stream the records of one raw shard (`read_records`), whatever its format; see `sources` for what
names the shards. Every reader holds one record (at most `max_doc_bytes`) plus one read chunk or batch:

  * JSON lines and text are read **here, line by line**: each line is decoded and parsed on its own so
    that one bad line (invalid UTF-8, a lone surrogate, a malformed JSON line, a NUL byte, a gigantic
    record) is skipped and reported with its file, line and byte offset; `datasets`' json/text
    builders abort the whole file on the first such line and cannot say where. In text files a
    document (line, paragraph or whole file, `text_sample_by`) with a bad line in it, or bigger than
    `max_doc_bytes`, is skipped whole as one bad record: no part of it is kept.
  * JSON arrays are read a chunk at a time (`json_array`).
  * Parquet is read with `pyarrow.parquet.ParquetFile.iter_batches` over the text column only; a
    missing or non-string text column fails at once, naming the columns present. So does a
    save_to_disk directory's (read with `datasets.load_from_disk`). A JSON file in which no object has
    the text field (it holds `content` where `text` was configured) fails at its end naming the keys
    its objects have: a wrong `data_prep.text_field` is not a file of bad records.
  * Hub datasets stream through `datasets.load_dataset(..., streaming=True)`.

A file that cannot be read to its end (a truncated or corrupt gzip, a parquet file without its footer
or with a corrupt page, a hub stream that breaks) raises `InputDataError` naming the file and where it
broke: the records after that point cannot be counted, so it is never a skipped bad record.
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubellm.core.errors import InputDataError
from kubellm.data_prep.json_array import read_json_array
from kubellm.data_prep.records import (
    READ_ERRORS,
    FieldSeen,
    Record,
    bad_record,
    check_text,
    is_gzip,
    is_json_array,
    lines,
    object_record,
    parse_json,
    too_large,
    unreadable,
)
from kubellm.data_prep.sources import ARROW, Source, parse_hub


def _jsonl(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    seen = FieldSeen(field)
    tried, parsed, first_bad = 0, 0, ""
    for line_no, offset, line, nbytes in lines(path, label, max_bytes):
        where = f"{label}:line {line_no} (byte {offset})"
        if line is None:
            yield bad_record(where, nbytes, too_large(nbytes, max_bytes))
            continue
        if not line.strip():
            continue  # blank lines between JSON records are not records
        tried += 1
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            first_bad = first_bad or f"line {line_no}: invalid_utf8: {e.reason}"
            yield bad_record(f"{label}:line {line_no} (byte {offset + e.start})", nbytes,
                       f"invalid_utf8: {e.reason}")
            continue
        obj, reason = parse_json(s.rstrip("\r\n"))  # a line cut off inside a string: "Unterminated string"
        if reason:
            first_bad = first_bad or f"line {line_no}: {reason}"
            yield bad_record(where, nbytes, reason)
            continue
        parsed += 1
        seen.note(obj)
        yield object_record(obj, where, nbytes, field)
    if tried > 1 and not parsed:  # not one bad line among good ones: the file is not JSON Lines
        raise InputDataError(
            f"{label}: none of its {tried} lines is JSON (first: {first_bad}); expected JSON Lines in UTF-8, "
            "one object per line (a .json file holding one pretty-printed object: make it a JSON array "
            "of objects or JSON Lines)")
    seen.check(label)


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
                yield bad_record(start, size, too_large(size, max_bytes))
            elif problem is not None:
                yield bad_record(problem[0], size, problem[1])
            else:
                text = "".join(parts)
                ok, reason = check_text(text.rstrip("\r\n") if sample_by == "line" else text, "text")
                yield Record(ok, start, size) if reason is None else bad_record(start, size, reason)
        parts.clear()
        start, size, problem = "", 0, None

    for line_no, offset, line, nbytes in lines(path, label, max_bytes):
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

# --- Parquet and hub datasets ------------------------------------------------------------------

_PARQUET_BATCH = 256  # rows per batch: memory is a batch of the text column


def _value_record(value: Any, where: str, field: str, max_bytes: int) -> Record:
    """The record for one text value from parquet (bytes or None) or a hub dataset (any)."""
    if isinstance(value, bytes):
        if len(value) > max_bytes:
            return bad_record(where, len(value), too_large(len(value), max_bytes))
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return bad_record(f"{where} (byte {e.start} of the value)", len(value), f"invalid_utf8: {e.reason}")
    text, reason = check_text(value, field)
    if reason is not None:
        detail = f"no string field {field!r}" if reason in ("missing_field", "not_text") else ""
        size = len(value.encode("utf-8", "replace")) if isinstance(value, str) else 0  # as JSON lines count it
        return bad_record(where, size, f"{reason}: {detail}" if detail else reason)
    assert text is not None
    nbytes = len(text.encode("utf-8"))
    if nbytes > max_bytes:
        return bad_record(where, nbytes, too_large(nbytes, max_bytes))
    return Record(text, where, nbytes)


def _parquet(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        f = stack.enter_context(gzip.open(path, "rb")) if is_gzip(path) else path
        try:
            pf = stack.enter_context(pq.ParquetFile(f))
        except (pa.ArrowException, *READ_ERRORS) as e:
            raise unreadable(label, "its footer (not a readable parquet file)", e) from e
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
            rows = pf.metadata.row_group(group).num_rows
            for batch in _read_guarded(
                    pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group], columns=[field]), label,
                    first, f"row group {group}: rows {first}-{first + rows - 1} of {total}", len):
                col = batch.column(0)
                # the values as UTF-8 bytes, decoded per row so that bad bytes are one bad record
                values = (col.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
                          if pa.types.is_string(kind) or pa.types.is_large_string(kind) else col).to_pylist()
                for value in values:
                    yield _value_record(value, f"{label}:row {row}", field, max_bytes)
                    row += 1
        if row != total:
            raise InputDataError(f"{label}: {row} rows read, but its footer says {total}; the file is corrupt")


def _read_guarded(batches: Iterator[Any], label: str, row: int, context: str, size: Any) -> Iterator[Any]:
    """`batches` (the first holding row `row`; `size(batch)` rows each), with a read error (Arrow, I/O,
    decompression) raised as an InputDataError naming the row reading stopped at and `context`."""
    import pyarrow as pa

    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, *READ_ERRORS) as e:
            raise unreadable(label, f"row {row} ({context}; rows before {row} were read)", e) from e
        yield batch
        row += size(batch)


def _arrow_dataset(path: Path, label: str, field: str, max_bytes: int, split: str) -> Iterator[Record]:
    """A `datasets` save_to_disk directory, through `datasets.load_from_disk` (its arrow files are
    memory-mapped; the text column is read a batch at a time). A DatasetDict is read at `split`."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, JSONDecodeError, ArrowInvalid, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise InputDataError(f"{label}: not a readable `datasets` save_to_disk directory ({type(e).__name__}: "
                             f"{msg[:200]}); re-save it with save_to_disk, or leave it out of the input") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputDataError(f"{label}: this DatasetDict has no split {split!r} (data_prep.hub_split); "
                                 f"its splits are {list(ds)}")
        ds, label = ds[split], f"{label}[{split}]"
    if field not in ds.column_names:
        raise InputDataError(f"{label}: no column {field!r} (data_prep.text_field); the columns are "
                             f"{ds.column_names}")
    kind = ds.features[field]
    if not (isinstance(kind, datasets.Value)
            and kind.dtype in ("string", "large_string", "binary", "large_binary")):
        raise InputDataError(f"{label}: column {field!r} (data_prep.text_field) holds {kind}, expected strings")
    row, total = 0, len(ds)
    for batch in _read_guarded(ds.select_columns([field]).iter(batch_size=_PARQUET_BATCH), label, 0, f"of {total}",
                               lambda b: len(b[field])):
        for value in batch[field]:
            yield _value_record(value, f"{label}:row {row}", field, max_bytes)
            row += 1
    if row != total:
        raise InputDataError(f"{label}: {row} rows read, but it says it has {total}; it is corrupt")


def _hub(name: str, config_name: str | None, split: str, label: str, field: str,
         max_bytes: int, revision: str | None = None) -> Iterator[Record]:
    import datasets

    row = 0
    pin = {"revision": revision} if revision else {}
    try:
        rows = iter(datasets.load_dataset(name, config_name, split=split, streaming=True, **pin))
    except Exception as e:  # datasets/huggingface_hub raise many types (network, missing dataset)
        raise InputDataError(f"{label}: cannot open the hub dataset (split {split!r}): "
                             f"{type(e).__name__}: {str(e)[:300]}") from e
    while True:
        try:
            obj = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a stream that breaks part way: the rest cannot be counted
            raise unreadable(label, f"row {row}", e, "the stream broke") from e
        if row == 0 and field not in obj:  # one schema for every row: fail now, not after the whole stream
            raise InputDataError(f"{label}: its rows have no field {field!r} (data_prep.text_field); the fields "
                                 f"they have: {', '.join(map(repr, list(obj)[:20])) or 'none'}. Set "
                                 "data_prep.text_field to the one that holds the text.")
        yield _value_record(obj.get(field), f"{label}:row {row}", field, max_bytes)
        row += 1


def read_records(source: Source, local: Path | None, *, field: str, max_bytes: int,
                 sample_by: str = "paragraph", hub_split: str = "train") -> Iterator[Record]:
    """Stream the records of one source (local = its staged local path; None for hub sources)."""
    label = source.uri
    if source.format == "hub":
        name, cfg, _ = parse_hub(source.uri)
        _, _, revision = parse_hub(source.fingerprint)  # the commit it was pinned to when listed, if any
        yield from _hub(name, cfg, hub_split, label, field, max_bytes, revision)
        return
    assert local is not None
    if source.format == "parquet":
        yield from _parquet(local, label, field, max_bytes)
    elif source.format == "text":
        yield from _text(local, label, sample_by, max_bytes)
    elif source.format == ARROW:
        yield from _arrow_dataset(local, label, field, max_bytes, hub_split)
    elif source.format == "json" and is_json_array(local):
        yield from read_json_array(local, label, field, max_bytes)
    else:
        yield from _jsonl(local, label, field, max_bytes)
