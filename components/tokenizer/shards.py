"""Packed token shards: the format the tokenizer writes and the trainer streams.

Layout of one `.tok` file (little-endian):

    offset  size  field
    0       8     magic  b"KLLMTOK\\0"
    8       4     version (uint32) = 1
    12      4     dtype code (uint32): 1 = uint16, 2 = uint32
    16      8     vocab_size (uint64): every token id is < vocab_size
    24      8     token_count (uint64)
    32      8     doc_count (uint64)
    40      24    reserved (zero)
    64      token_count × itemsize     token ids, documents back to back
    ...     (doc_count + 1) × 8        document start offsets (uint64), last = token_count

    w = TokenShardWriter(path, vocab_size=2048); w.add_document(ids); w.close()
    r = TokenShardReader(path)    # validates header, size, offsets and ids; r.tokens is a read-only memmap
"""

from __future__ import annotations

import contextlib
import os
import struct
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubellm.core.errors import InputDataError

MAGIC = b"KLLMTOK\0"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQQ24x")
assert _HEADER.size == HEADER_SIZE
DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> int:
    return 1 if vocab_size <= 65536 else 2


class TokenShardWriter:
    """Streams documents into one shard; the header is written on `close()` (temp file + rename, so
    a crash never leaves a shard with a valid header and a short body)."""

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.code = dtype_for_vocab(vocab_size)
        self.dtype = DTYPES[self.code]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * HEADER_SIZE)
        self._offsets = array("Q", [0])  # 8 bytes a document (a list of ints held ~36)
        self.token_count = 0

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """One document (its own checks, not `add_packed`'s: a per-document caller pays no batch set-up)."""
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{self.path}: document {len(self._offsets) - 1}: token ids must be integers, "
                             f"got {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise InputDataError(
                f"{self.path}: document {len(self._offsets) - 1} has token id "
                f"{int(arr.max() if arr.max() >= self.vocab_size else arr.min())} outside [0, {self.vocab_size})"
            )
        self._f.write(arr.astype(self.dtype).tobytes())
        self.token_count += int(arr.size)
        self._offsets.append(self.token_count)

    def add_documents(self, docs: Iterable[Sequence[int]]) -> None:
        for d in docs:
            self.add_document(d)

    def add_packed(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: `tokens` back to back, `lengths[i]` tokens each (one
        range check and one write for the lot)."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{self.path}: token ids must be integers, got {tokens.dtype}")
        if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"{self.path}: document lengths must be integers, got {lengths.dtype}")
        lengths = lengths.astype(np.int64, copy=False)
        if lengths.size and int(lengths.min()) < 0:
            raise ValueError(f"{self.path}: document lengths must be ≥ 0, got {int(lengths.min())}")
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if tokens.size:
            bad = np.flatnonzero((tokens < 0) | (tokens >= self.vocab_size))
            if bad.size:
                doc = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
                raise InputDataError(f"{self.path}: document {len(self._offsets) - 1 + doc} has token id "
                                     f"{int(tokens[bad[0]])} outside [0, {self.vocab_size})")
        self._f.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._offsets.frombytes((self.token_count + np.cumsum(lengths)).astype(np.uint64).tobytes())
        self.token_count += int(tokens.size)

    def close(self) -> Path:
        """Write the offsets and the header, flush to disk, and rename into place. A failure here
        (a full disk) removes the partial file; a second call is refused."""
        if self._f.closed:
            raise ValueError(f"{self.path}: the shard writer is already closed")
        try:
            self._f.write(np.frombuffer(self._offsets, dtype=np.uint64).astype("<u8", copy=False).tobytes())
            self._f.seek(0)
            self._f.write(_HEADER.pack(MAGIC, VERSION, self.code, self.vocab_size, self.token_count,
                                       len(self._offsets) - 1))
            self._f.flush()
            os.fsync(self._f.fileno())  # the body is on disk before the name says the shard is complete
            self._f.close()
            self._tmp.replace(self.path)
        except BaseException:
            self._discard()
            raise
        return self.path

    def _discard(self) -> None:
        """Close without caring how (a full disk fails the final flush too) and remove the partial file."""
        try:
            with contextlib.suppress(OSError):
                self._f.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif not self._f.closed:
            self._discard()


class TokenShardReader:
    """Opens and validates a shard; `tokens` and `doc_offsets` are read-only memmaps.

    Header and size are always checked (a few bytes); `scan` also reads the whole shard to check that
    the document offsets ascend and every id is < the shard's vocab (`open_shards` splits that read
    between the ranks of a job)."""

    def __init__(self, path: str | Path, expected_vocab_size: int | None = None, scan: bool = True) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < HEADER_SIZE:
            raise InputDataError(f"{self.path}: {size} bytes is shorter than the {HEADER_SIZE}-byte header")
        with open(self.path, "rb") as f:
            magic, version, code, vocab, ntok, ndoc = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise InputDataError(f"{self.path}: bad magic {magic!r}, expected {MAGIC!r} (not a token shard)")
        if version != VERSION:
            raise InputDataError(f"{self.path}: shard version {version}, this kubellm reads version {VERSION}")
        if code not in DTYPES:
            raise InputDataError(f"{self.path}: dtype code {code}, expected one of {sorted(DTYPES)}")
        self.dtype = DTYPES[code]
        self.vocab_size, self.token_count, self.doc_count = int(vocab), int(ntok), int(ndoc)
        expected = HEADER_SIZE + ntok * self.dtype.itemsize + (ndoc + 1) * 8
        if size != expected:
            raise InputDataError(
                f"{self.path}: file is {size} bytes but its header (tokens={ntok}, docs={ndoc}) "
                f"implies {expected} (truncated or corrupt)"
            )
        if expected_vocab_size is not None and self.vocab_size > expected_vocab_size:
            raise InputDataError(
                f"{self.path}: shard vocab_size {self.vocab_size} exceeds the model's vocab_size "
                f"{expected_vocab_size}"
            )
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_SIZE, shape=(ntok,))
        self.doc_offsets = np.memmap(self.path, dtype="<u8", mode="r",
                                     offset=HEADER_SIZE + ntok * self.dtype.itemsize, shape=(ndoc + 1,))
        if scan:
            self.check_offsets()
            self.check_ids(self.vocab_size)  # the shard's own vocab (≤ the model's): the writer never goes past it

    def check_offsets(self) -> None:
        """Document offsets must run 0 … token_count without going back (doc-masking positions and
        `document()` slice by them)."""
        offs = np.asarray(self.doc_offsets)
        if int(offs[0]) != 0 or int(offs[-1]) != self.token_count:
            raise InputDataError(
                f"{self.path}: document offsets run {int(offs[0])} … {int(offs[-1])}, expected 0 … "
                f"token_count={self.token_count} (corrupt offset table)"
            )
        if offs.size > 1:
            back = np.flatnonzero(offs[1:] < offs[:-1])
            if back.size:
                i = int(back[0]) + 1
                raise InputDataError(
                    f"{self.path}: document offset {i} is {int(offs[i])}, below offset {i - 1} = "
                    f"{int(offs[i - 1])} (corrupt offset table)"
                )

    def check_ids(self, vocab_size: int, block: int = 1 << 22) -> None:
        for start in range(0, self.token_count, block):
            chunk = self.tokens[start : start + block]
            if chunk.size and int(chunk.max()) >= vocab_size:
                bad = start + int(np.argmax(chunk >= vocab_size))
                raise InputDataError(
                    f"{self.path}: token {bad} has id {int(self.tokens[bad])} ≥ vocab_size {vocab_size}"
                )

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[int(self.doc_offsets[i]) : int(self.doc_offsets[i + 1])])
