"""What data prep reads a raw file into: a `Record` (a document, or a bad record naming where and
why), the checks every reader applies to a text value, and opening a (possibly gzipped) file whose
read errors name the file and where it broke. Shared by every format's reader (`readers`,
`json_array`) and by SFT/DPO's chat and preference files.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubellm.core.errors import InputDataError

BOM = codecs.BOM_UTF8  # a UTF-8 byte-order mark, ignored at the start of any file
_WIDE_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)  # UTF-32-LE's starts like 16-LE's


@dataclasses.dataclass
class Record:
    """One document read from a source, or a bad record (`text` None, `reason` set)."""

    text: str | None
    where: str                  # "file:line 12 (byte 345)" or "file:row 7"
    nbytes: int
    reason: str | None = None   # bad-record kind: invalid_utf8, lone_surrogate, nul_byte, empty, ...
    detail: str = ""



def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_binary(path: Path) -> Any:
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


# What a broken file raises while it is read (gzip, zlib, the OS); pyarrow raises ArrowException/OSError.
READ_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, OSError)


def unreadable(label: str, where: str, e: BaseException, what: str = "the file is truncated or corrupt"
                ) -> InputDataError:
    msg = str(e).splitlines()[0] if str(e) else ""
    return InputDataError(
        f"{label}: cannot be read past {where} ({type(e).__name__}: {msg[:200]}); {what}, and the "
        "records after that point cannot be counted, so they are not skipped as bad records. Re-create "
        "or re-download it, or leave it out of the input.")


def too_large(nbytes: int, max_bytes: int) -> str:
    return f"too_large: {nbytes} bytes, more than data_prep.max_doc_bytes={max_bytes}"


def lines(path: Path, label: str, max_bytes: int) -> Iterator[tuple[int, int, bytes | None, int]]:
    """Yield (line_no, byte_offset, line, nbytes) without ever holding more than `max_bytes` + 1 of
    one line; `line` is None for a line longer than `max_bytes` (`nbytes` is then its whole size).
    A UTF-8 BOM at the start of a line is not part of it (line 1's, and each later file's in a
    `cat a.jsonl b.jsonl` concatenation). A file that cannot be read to its end (a truncated or
    corrupt gzip) raises InputDataError naming the line and byte where it broke."""
    offset, line_no = 0, 0
    with open_binary(path) as f:
        while True:
            try:
                line = f.readline(max_bytes + 1)
            except READ_ERRORS as e:
                raise unreadable(label, f"line {line_no} (byte {offset} of its uncompressed data)", e) from e
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
                except READ_ERRORS as e:
                    raise unreadable(label, f"byte {offset} (inside line {line_no}, uncompressed)", e) from e
                yield line_no, start, None, offset - start
                continue
            if line_no == 1 and line.startswith(_WIDE_BOMS):
                raise InputDataError(
                    f"{label}: starts with a UTF-16/UTF-32 byte-order mark; kubellm reads UTF-8 text (convert "
                    "it, e.g. `iconv -f UTF-16 -t UTF-8`)")
            if line.startswith(BOM):
                line, start = line[len(BOM):], start + len(BOM)
            yield line_no, start, line, len(line)



def check_text(text: Any, field: str) -> tuple[str | None, str | None]:
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


def parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None), or (None, the bad-record reason) for text that is not JSON or not a value this
    reader can hold (`beyond_json_limits`)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"malformed_json: {e.msg}: column {e.colno}"
    except (ValueError, RecursionError) as e:
        return None, beyond_json_limits(e)


def beyond_json_limits(e: ValueError | RecursionError) -> str:
    """The reason for well-formed JSON that Python will not build: an integer of more than its 4300
    digits, nesting deeper than the recursion limit. One bad record, never an error that stops the stage."""
    return "malformed_json: " + ("nested too deeply to parse" if isinstance(e, RecursionError) else str(e))


def bad_record(where: str, n: int, reason: str) -> Record:
    kind, _, detail = reason.partition(": ")
    return Record(None, where, n, kind, detail)


def object_record(obj: Any, where: str, nbytes: int, field: str) -> Record:
    """The record for one parsed JSON value (a JSON line or an element of a JSON array)."""
    if not isinstance(obj, dict):
        return bad_record(where, nbytes, f"not_text: expected a JSON object, got {type(obj).__name__}")
    text, reason = check_text(obj.get(field), field)
    if reason:
        detail = f"no string field {field!r}" if reason in ("missing_field", "not_text") else ""
        return bad_record(where, nbytes, f"{reason}: {detail}" if detail else reason)
    return Record(text, where, nbytes)


class FieldSeen:
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



def is_json_array(path: Path) -> bool:
    try:
        with open_binary(path) as f:
            head = f.read(4096)
    except READ_ERRORS:
        return False  # read as JSON lines, which names where the file broke
    return head.removeprefix(BOM).lstrip().startswith(b"[")
