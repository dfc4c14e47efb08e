"""JSON arrays, read a chunk at a time: the extent of each element is found (strings, escapes and
nesting only) and the element is parsed by `json`, so memory is one element (at most `max_doc_bytes`)
plus one read chunk. `datasets` loads a JSON array whole into memory and JSON-encodes a whole column
when one value is not a string. An element larger than `max_doc_bytes` is skipped without being held.
A malformed element is a hard error: past it the array's structure cannot be trusted, so what is lost
could not be counted.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubellm.core.errors import InputDataError
from kubellm.data_prep.records import (
    READ_ERRORS,
    FieldSeen,
    Record,
    bad_record,
    beyond_json_limits,
    object_record,
    open_binary,
    too_large,
    unreadable,
)

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
        except READ_ERRORS as e:
            raise unreadable(self.label, f"byte {self.read_bytes} (of its uncompressed data)", e) from e
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
            raise unreadable(src.label, f"{where}: the file ends inside it",
                              EOFError("unterminated JSON array element"))
        i -= shift
    size += _utf8_len(src.buf[i:end])
    text = None if dropped or size > max_bytes else src.buf[src.pos:end]
    src.pos, src.offset = end, src.offset + size
    return text, size


def read_json_array(path: Path, label: str, field: str, max_bytes: int) -> Iterator[Record]:
    """The elements of a file holding one JSON array, streamed in bounded memory."""

    def broken(where: str, what: str) -> InputDataError:
        return InputDataError(f"{label}: {where}: {what}; past it the array cannot be read reliably, "
                              "so the file is not used (fix it, or write it as JSON lines, where one bad "
                              "line is skipped and counted)")

    seen = FieldSeen(field)
    with open_binary(path) as f:
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
                yield bad_record(where, size, too_large(size, max_bytes))
                continue
            if m := _ESCAPED_BYTE.search(text):
                yield bad_record(f"{label}:element {index - 1} (byte {start + _utf8_len(text[:m.start()])})", size,
                           "invalid_utf8: not UTF-8")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise broken(f"element {index - 1} (byte {start})", f"malformed JSON ({e.msg}: char {e.pos} "
                             "of the element)") from e
            except (ValueError, RecursionError) as e:
                yield bad_record(where, size, beyond_json_limits(e))
                continue
            seen.note(obj)
            yield object_record(obj, where, size, field)
