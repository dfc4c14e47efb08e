"""Raw sources for data prep: resolve what `--input raw=...` names, and stream its records.

A raw input is a comma-separated list of any of:
  * a local file, directory (searched recursively) or glob (`data/**/*.jsonl.gz`)
  * an `s3://bucket/prefix` (every object under it) or `s3://bucket/key` (one object) — staged
    through kubellm's storage layer (`storage_for(uri).download`) into a temp dir, one shard at a
    time, each in a directory of its own (two objects with one base name never share a local file);
    never `datasets`' s3fs path (its aiobotocore pin fights boto3's)
  * `hf:<name>[:<config>]` — a Hugging Face Hub dataset streamed with
    `datasets.load_dataset(name, config, split=..., streaming=True)` (needs a network)

Formats by suffix, any case (optionally `.gz`): `.jsonl`/`.ndjson`/`.json` (JSON lines, or one JSON
array for `.json`), `.parquet`, `.txt`/`.text`/`.md`. A leading UTF-8 byte-order mark is ignored. A
directory written by `datasets`' `save_to_disk` (`state.json` + `dataset_info.json` + `*.arrow`, or a
DatasetDict's `dataset_dict.json` + one such directory per split) is one shard, read with
`datasets.load_from_disk` (a DatasetDict at `data_prep.hub_split`), wherever a scan finds it.

Directory and S3-prefix scans follow the same rules: paths with a part starting with `_` or `.`
(`_manifest.json`, `.hidden/`, `_tmp/`) are not inputs, and a file no reader knows the format of
(`.csv`, `.jsonl.zst`, a loose `.arrow`) is skipped with a warning naming it (data prep lists the
skipped files in its manifest and report); a glob skips such files the same way. A file named on its
own with an unknown format is an error, and so is an item with nothing readable ("no readable files
(skipped: ...)").

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
    missing or non-string text column fails at once, naming the columns present. So does a
    save_to_disk directory's. A JSON file in which no object has the text field (it holds `content`
    where `text` was configured) fails at its end naming the keys its objects have: a wrong
    `data_prep.text_field` is not a file of bad records.
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
import hashlib
import json
import logging
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.core.storage import ObjectInfo, Storage, is_s3, storage_for

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
           ".txt": "text", ".text": "text", ".md": "text"}
HUB_SCHEME = "hf:"
ARROW = "arrow"  # the format of a `datasets` save_to_disk directory (a Dataset or a DatasetDict)
_DATASET_STATE, _DATASET_INFO, _DATASET_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
_SHOWN = 5  # names of skipped files shown in a warning or an error
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


class SourceScan(NamedTuple):
    """What a raw input names: the shards to read, and the files a directory, glob or S3-prefix scan
    left out because no reader knows their format (see `scan_sources`)."""

    sources: list[Source]
    skipped: list[str]


def _ignored(parts: Sequence[str]) -> bool:
    """A path with a part starting with `.` or `_` (`_manifest.json`, `.hidden/`, `_tmp/`) found by a
    directory or S3-prefix scan is not an input."""
    return any(part.startswith((".", "_")) for part in parts)


def _under(rel: str, root: str) -> bool:
    """Whether the '/'-separated relative path `rel` is `root` or inside it ('' is the scanned root)."""
    return not root or rel == root or rel.startswith(root + "/")


def _dataset_roots(rels: Iterable[str]) -> list[str]:
    """The `datasets` save_to_disk directories among '/'-separated relative file paths: a directory
    holding `dataset_dict.json` (a DatasetDict), or `state.json` beside `dataset_info.json` (a
    Dataset). Outermost only: a DatasetDict's split directories are part of it."""
    files = set(rels)
    roots = set()
    for rel in files:
        parent, _, name = rel.rpartition("/")
        if name == _DATASET_DICT or (name == _DATASET_STATE
                                     and (f"{parent}/{_DATASET_INFO}" if parent else _DATASET_INFO) in files):
            roots.add(parent)
    return sorted(r for r in roots if not any(o != r and _under(r, o) for o in roots))


def _classify(rels: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(relative path, format)], skipped) for the files a scan found: files by suffix, each save_to_disk
    directory as one `ARROW` entry (its own files are part of it), and the files of no known format."""
    roots = _dataset_roots(rels)
    entries: list[tuple[str, str]] = [(r, ARROW) for r in roots]
    skipped: list[str] = []
    for rel in rels:
        if any(_under(rel, r) for r in roots):
            continue
        fmt = format_of(rel)
        if fmt is None:
            skipped.append(rel)
        else:
            entries.append((rel, fmt))
    return entries, skipped


def _local_dataset_root(path: Path) -> Path | None:
    """The save_to_disk directory a file (or directory) found by a glob belongs to, or None."""
    d = path if path.is_dir() else path.parent
    if (d / _DATASET_DICT).is_file():
        return d
    if (d / _DATASET_STATE).is_file() and (d / _DATASET_INFO).is_file():
        return d.parent if (d.parent / _DATASET_DICT).is_file() else d
    return None


def _digest(items: Any) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def directory_fingerprint(path: Path, skip: Any = None) -> str:
    """What a local directory holds, by its resolved path and its files' names, sizes and mtimes
    (`skip(parts)`: leave a file out by its relative path's parts). Changes when any file does."""
    files = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not (skip and skip(rel.parts)):
            st = f.stat()
            files.append([rel.as_posix(), st.st_size, st.st_mtime_ns])
    return f"{path.resolve()}@{_digest(files)}"


def _local_source(path: Path, fmt: str) -> Source:
    if fmt == ARROW:  # a save_to_disk directory
        return Source(str(path), fmt, directory_fingerprint(path, _ignored))
    st = path.stat()
    return Source(str(path), fmt, f"{path.resolve()}@{st.st_size}:{st.st_mtime_ns}")


def _s3_dataset_objects(st: Storage, root: str) -> list[ObjectInfo]:
    """The objects of a save_to_disk directory on S3 (its `_`/`.` paths and folder markers left out)."""
    return [o for o in st.list(root) if o.relpath and not o.relpath.endswith("/")
            and not _ignored(o.relpath.split("/"))]


def _s3_source(st: Storage, uri: str, fmt: str, obj: ObjectInfo | None) -> Source:
    if fmt == ARROW:
        objs = _s3_dataset_objects(st, uri)
        return Source(uri, fmt, f"{uri}@{_digest([[o.relpath, o.etag, o.size] for o in objs])}")
    assert obj is not None
    return Source(obj.uri, fmt, f"{obj.uri}@{obj.etag}:{obj.size}")


def _shown(names: Sequence[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


_EXPECTED = f"expected suffixes {sorted(FORMATS)}, optionally .gz, or a `datasets` save_to_disk directory"


def _resolve_item(item: str, skipped: list[str]) -> list[Source]:
    """The shards one comma-separated item names (sorted); files a scan leaves out are added to `skipped`."""
    if item.startswith(HUB_SCHEME):
        return [Source(item, "hub", item)]
    if is_s3(item):
        st = storage_for(item)
        listed = st.list(item)
        key_name = item[len("s3://"):].rstrip("/").partition("/")[2].rpartition("/")[2]
        if not listed and "." in key_name:  # a file name: one object named by its key, not a prefix?
            objs = [o for o in st.list(item.rsplit("/", 1)[0]) if o.uri == item]
            if objs:
                fmt = format_of(item)
                if fmt is None:  # named on its own: an error, not a skip (as a local file)
                    raise ConfigError(f"{item}: unknown format; {_EXPECTED}")
                return [_s3_source(st, item, fmt, objs[0])]
        # the local scan's rules: folder markers (`dir/`) are no files; `_`/`.` paths are no inputs
        visible = [o for o in listed if o.relpath and not o.relpath.endswith("/")
                   and not _ignored(o.relpath.split("/"))]
        entries, unknown = _classify([o.relpath for o in visible])
        by_rel = {o.relpath: o for o in visible}
        unknown_uris = [by_rel[r].uri for r in unknown]
        skipped += unknown_uris
        if not entries:
            why = ("no such object, and nothing is stored under it" if not listed else
                   f"skipped, no reader for their format: {_shown(unknown_uris)}" if unknown else
                   f"its {len(listed)} object(s) are folder markers or under `_`/`.` paths, never inputs")
            raise InputDataError(f"{item}: no readable objects under this S3 prefix ({why}); {_EXPECTED}")
        base = item.rstrip("/")
        return [_s3_source(st, f"{base}/{rel}" if rel else base, fmt, by_rel.get(rel))
                for rel, fmt in sorted(entries)]  # S3's order: by key string
    p = Path(item)
    if p.is_file():
        fmt = format_of(p.name)
        if fmt is None:  # named on its own: an error, not a skip
            root = _local_dataset_root(p)
            hint = f"; it is part of the `datasets` save_to_disk directory {root}: name that" if root else ""
            raise ConfigError(f"{p}: unknown format; {_EXPECTED}{hint}")
        return [_local_source(p, fmt)]
    found: dict[Path, str] = {}
    left_out: list[str] = []
    if p.is_dir():
        rels = sorted(f.relative_to(p) for f in p.rglob("*") if f.is_file())
        entries, names = _classify([r.as_posix() for r in rels if not _ignored(r.parts)])
        found = {p / rel: fmt for rel, fmt in entries}
        left_out = [str(p / n) for n in names]
    else:
        for m in sorted(Path(f) for f in glob.glob(item, recursive=True)):
            root = _local_dataset_root(m)
            if root is not None:
                found[root] = ARROW
            elif m.is_file():
                fmt = format_of(m.name)
                if fmt is None:
                    left_out.append(str(m))
                else:
                    found[m] = fmt
    skipped += left_out
    if not found:
        if left_out:
            raise InputDataError(f"{item}: no readable files (skipped, no reader for their format: "
                                 f"{_shown(left_out)}); {_EXPECTED}")
        if p.is_dir():
            raise InputDataError(f"{item}: no readable files in this directory (it holds none outside "
                                 f"`_`/`.` paths); {_EXPECTED}")
        raise InputDataError(f"{item}: no such file, directory or glob match ({_EXPECTED})")
    return [_local_source(f, fmt) for f, fmt in sorted(found.items())]


def scan_sources(raw: str, *, warn: bool = True) -> SourceScan:
    """Expand the raw input into an ordered list of shards (sorted within each item), and the files
    that directory, glob and S3-prefix scans left out because no reader knows their format (logged
    as a warning with the first few names; data prep records them in its manifest and report). A
    file named on its own with an unknown format is an error; an item with nothing readable is one
    too, naming what it skipped."""
    out: list[Source] = []
    skipped: list[str] = []
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        before = len(skipped)
        out += _resolve_item(item, skipped)
        if warn and len(skipped) > before:
            log.warning("%s: skipping %d file(s) that no reader knows the format of: %s (%s)", item,
                        len(skipped) - before, _shown(skipped[before:]), _EXPECTED)
    if not out:
        raise ConfigError(f"raw input {raw!r} names no sources")
    return SourceScan(out, skipped)


def resolve_sources(raw: str) -> list[Source]:
    """Expand the raw input into an ordered list of shards (sorted within each item); see `scan_sources`."""
    return scan_sources(raw).sources


def resolve_uri(uri: str) -> list[Source]:
    """The shards one source URI names (a `Source.uri`, taken whole: a comma in it is part of the name)."""
    return _resolve_item(uri, [])


def current_fingerprint(source: Source) -> str | None:
    """The fingerprint `source` has now (None when it is gone or no longer one shard), to compare with
    the one recorded when the input was listed."""
    if source.format == "hub":
        return source.fingerprint
    try:
        found = resolve_uri(source.uri)
    except (InputDataError, ConfigError):
        return None
    return found[0].fingerprint if len(found) == 1 and found[0].format == source.format else None


def check_unchanged(source: Source, recorded: str, when: str, *, now: str | None = "") -> None:
    """Raise InputDataError naming the file when its fingerprint is no longer `recorded` (the one the
    artifact's address was computed from, `when`). `now`: the current fingerprint when the caller has
    just resolved it (None: gone); looked up by default."""
    if now == "":
        now = current_fingerprint(source)
    if now != recorded:
        state = "is gone" if now is None else f"fingerprint {now!r} now"
        raise InputDataError(
            f"{source.uri}: changed since {when} (fingerprint {recorded!r} then, {state}); what was read "
            "would be published under the address of the old content. Re-run so that the input is "
            "listed again, and leave the input unchanged while data prep reads it.")


def stage_local(source: Source, tmp_dir: Path) -> Path:
    """A local path for the source: S3 objects (and save_to_disk directories) are downloaded through
    kubellm's storage layer. Each S3 source gets its own directory under `tmp_dir`, named by a hash of
    its URI, and keeps its base name there (`<tmp_dir>/<hash>/train.jsonl`): `s3://b/en/train.jsonl` and
    `s3://b/fr/train.jsonl` never land on the same file, and a file's suffix still says its format."""
    if not is_s3(source.uri):
        return Path(source.uri)
    name = Path(source.uri.split("://", 1)[1].rstrip("/")).name
    dest = tmp_dir / hashlib.sha256(source.uri.encode("utf-8")).hexdigest()[:20] / (
        name if name not in ("", ".", "..") else "object")
    st = storage_for(source.uri)
    if source.format != ARROW:
        st.download(source.uri, dest)
        return dest
    for o in _s3_dataset_objects(st, source.uri):
        parts = o.relpath.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise InputDataError(f"{o.uri}: key part {o.relpath!r} cannot be a local path; the "
                                 f"save_to_disk directory {source.uri} cannot be staged")
        st.download(o.uri, dest.joinpath(*parts))
    log.debug("staged %s -> %s", source.uri, dest)
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


class _FieldSeen:
    """Whether any JSON object of a file has the text field, and which keys its objects have: a file
    whose every object lacks the field (`content` where `text` was configured) is a wrong
    `data_prep.text_field`, not a file of bad records, and fails as a parquet file without the column does."""

    _MAX_KEYS = 50

    def __init__(self, field: str) -> None:
        self.field, self.objects, self.with_field = field, 0, 0
        self.keys: dict[str, int] = {}

    def note(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        self.objects += 1
        if self.field in obj:
            self.with_field += 1
        elif not self.with_field:
            for k in obj:
                if k in self.keys or len(self.keys) < self._MAX_KEYS:
                    self.keys[k] = self.keys.get(k, 0) + 1

    def check(self, label: str) -> None:
        if self.objects and not self.with_field:
            keys = sorted(self.keys, key=lambda k: -self.keys[k])
            shown = ", ".join(f"{k!r} ({self.keys[k]})" for k in keys[:20]) or "none (all are {})"
            raise InputDataError(
                f"{label}: none of its {self.objects} JSON object(s) has the field {self.field!r} "
                f"(data_prep.text_field); the keys they have (objects with each): {shown}. Set "
                "data_prep.text_field to the key that holds the text, or leave this file out of the input.")


def _jsonl(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    seen = _FieldSeen(field)
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
        seen.note(obj)
        yield _object_record(obj, where, nbytes, field)
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

    seen = _FieldSeen(field)
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
                seen.check(label)
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
            seen.note(obj)
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
        except (pa.ArrowException, *_READ_ERRORS) as e:
            raise _unreadable(label, f"row {row} ({context}; rows before {row} were read)", e) from e
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
    elif source.format == ARROW:
        yield from _arrow_dataset(local, label, field, max_bytes, hub_split)
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
