"""Streaming the packed token shards into training windows.

    shards = open_shards(local_paths, vocab_size=cfg.vocab_size, rank=r, world=w)  # validates; collective
    loader = PackedWindowLoader(shards, seq_len=128, micro_batch_size=8, dp_rank=r, dp_size=w, seed=1)
    batch = next(loader)          # {"input_ids": (B, T), "labels": (B, T)} (+ doc_ids, position_ids)
    state = loader.state_dict()   # exact position: resume with loader.load_state_dict(state)

Each window is `seq_len + 1` consecutive tokens of one shard (inputs = window[:-1], labels =
window[1:]); windows start every `seq_len` tokens, so consecutive windows share one token (the
last target of one is the first input of the next). Windows never cross a shard boundary: the last
`(tokens − 1) % seq_len` tokens of each shard are not trained on (negligible at the default shard size).

Order: epoch `e` is a permutation of all windows drawn from `(seed, e)`. That global order is dealt
round-robin to data-parallel ranks (rank r gets items r, r+dp, r+2dp, …), so ranks never overlap, and
any dp × micro × accum with the same global batch consumes the same windows per optimizer step
within an epoch — which is what makes the multi-process loss-parity tests possible. Each epoch drops
the windows left over after whole rounds of dp, so past the first epoch boundary the windows depend
on dp when the window count is not a multiple of it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubellm.core.errors import InputDataError
from kubellm.tokenizer.shards import TokenShardReader

log = logging.getLogger(__name__)

DROPPED_WARN_FRACTION = 0.01
"""Warn when the shard tails no window reaches (each shard's last `(tokens − 1) % seq_len` tokens, all
of a shard shorter than `seq_len + 1`) exceed this fraction of the tokens."""


def collate(rows: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch from fixed-shape examples: each key's arrays stacked along a new first dim
    (`keys`: those only; default every key of the first row)."""
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in (keys if keys is not None else rows[0])}


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """A host micro-batch on the training device (on CPU: the batch itself)."""
    if device == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def open_shards(paths: Sequence[str | Path], vocab_size: int, *, rank: int = 0,
                world: int = 1) -> list[TokenShardReader]:
    """Open and validate every shard at start-up, so bad data fails before the first step, naming the
    file: every shard's header and size here, and the whole-shard scan (offsets ascending, every id <
    `vocab_size`) of the shards `i ≡ rank (mod world)` only. Each rank of a job scans its share, so
    the job reads its corpus once between its ranks, not once per rank (terabytes each at a trillion
    tokens). Collective when `world > 1` (every rank must call it): a failure found on any rank is
    raised on all of them."""
    if not paths:
        raise InputDataError("no token shards (*.tok) found to train on")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} outside [0, world={world})")
    shards: list[TokenShardReader] = []
    error: BaseException | None = None
    try:
        for i, p in enumerate(sorted(map(str, paths))):
            shards.append(TokenShardReader(p, expected_vocab_size=vocab_size, scan=i % world == rank))
    except (InputDataError, OSError) as e:  # a missing file on one node too: its peers must not wait
        error = e
    if world > 1:
        from kubellm.training.collective import raise_if_any_failed

        raise_if_any_failed(error, "token shard check", {"InputDataError": InputDataError}, InputDataError)
    elif error is not None:
        raise error
    return shards


class PackedWindowLoader:
    """Micro-batches of packed `seq_len + 1` windows for one data-parallel rank, prepared by a
    background thread; `state_dict()` is the position of the last batch handed out (not prefetched)."""

    def __init__(self, shards: Sequence[TokenShardReader], *, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True, doc_masking: bool = False,
                 prefetch: int = 4) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and micro_batch_size={micro_batch_size} must both be ≥ 1")
        self.shards = list(shards)
        self.seq_len, self.micro, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.doc_masking, self.prefetch = shuffle, doc_masking, prefetch
        # (shard index, start token) of every window, in file order
        counts = [max(0, (s.token_count - 1) // seq_len) for s in self.shards]
        self.num_windows = int(sum(counts))
        # window i lives in the shard whose cumulative window count first passes i: O(shards) memory,
        # not two int64 entries per window (GBs per rank at a trillion tokens)
        self._first_window = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        total = sum(s.token_count for s in self.shards)
        dropped = total - sum(c * seq_len for c in counts)
        if dp_rank == 0 and total and dropped / total > DROPPED_WARN_FRACTION:
            log.warning("%.1f%% of the %d tokens in %d shard(s) are never trained on: windows of seq_len+1=%d "
                        "tokens do not cross a shard boundary, so each shard's tail is skipped; write larger "
                        "shards (tokenizer.tokens_per_shard, now ~%d tokens per shard) or train a shorter seq_len",
                        100 * dropped / total, total, len(self.shards), seq_len + 1, total // max(1, len(self.shards)))
        self.per_rank = self.num_windows // dp_size  # the tail that does not divide is dropped per epoch
        if self.per_rank < micro_batch_size:
            names = ", ".join(str(s.path) for s in self.shards[:3])
            raise InputDataError(
                f"token shards ({names}{', …' if len(self.shards) > 3 else ''}) hold {self.num_windows} "
                f"windows of seq_len+1={seq_len + 1} tokens; {dp_size} rank(s) × micro_batch_size="
                f"{micro_batch_size} need at least {dp_size * micro_batch_size}"
            )
        self.shard_fingerprint = _fingerprint(self.shards)
        self._pos = (0, 0)  # (epoch, items of this rank consumed in that epoch)
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()

    # -- order --------------------------------------------------------------------------------------
    def _rank_items(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            # int32 indices where they fit: half the memory, the same order (the shuffle draws do not
            # depend on the dtype)
            index = np.arange(self.num_windows, dtype=np.int32 if self.num_windows < 2**31 else np.int64)
            order = np.random.default_rng([self.seed, epoch]).permutation(index) if self.shuffle else index
            usable = self.per_rank * self.dp_size
            # a copy of this rank's share: a strided view would keep the whole epoch's order alive
            self._perm_cache = (epoch, order[:usable][self.dp_rank :: self.dp_size].copy())
        return self._perm_cache[1]

    def _window(self, item: int) -> dict[str, np.ndarray]:
        k = int(np.searchsorted(self._first_window, item, side="right")) - 1
        shard = self.shards[k]
        start = (int(item) - int(self._first_window[k])) * self.seq_len
        toks = np.asarray(shard.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        out = {"input_ids": toks[:-1], "labels": toks[1:]}
        if self.doc_masking:
            # per-token document index (relative to the window) and positions restarting per document
            # searched in the shard's own uint64 table (a dtype change would copy all of it per window)
            pos = np.arange(start, start + self.seq_len, dtype=np.uint64)
            doc = np.searchsorted(shard.doc_offsets, pos, side="right").astype(np.int64) - 1
            out["doc_ids"] = doc - doc[0]
            # a document that began before this window counts from the window's start (as the model's
            # own `positions_from_doc_ids` does): its offset within the document is unbounded and
            # indexed past the RoPE table (max_seq_len) once a document outgrew it
            begins = np.asarray(shard.doc_offsets[doc], dtype=np.int64)
            out["position_ids"] = pos.astype(np.int64) - np.maximum(begins, start)
        return out

    def _make_batch(self, pos: tuple[int, int]) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        epoch, offset = pos
        rows = []
        for _ in range(self.micro):
            if offset >= self.per_rank:
                epoch, offset = epoch + 1, 0
            rows.append(self._window(int(self._rank_items(epoch)[offset])))
            offset += 1
        return collate(rows), (epoch, offset)

    # -- iteration with background prefetch ---------------------------------------------------------
    def _producer(self, pos: tuple[int, int], q: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = self._make_batch(pos)
                pos = item[1]
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surface the error in the training thread, not silently here
            q.put(e)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._producer, args=(self._pos, self._queue, self._stop),
                                        name=f"kubellm-loader-r{self.dp_rank}", daemon=True)
        self._thread.start()

    def __iter__(self) -> PackedWindowLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None:
            self._start()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None  # the producer has exited: a later next() starts a fresh one, never waits forever
            raise item
        batch, self._pos = item
        return batch

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            self._queue = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._pos[0], "offset": self._pos[1], "seed": self.seed, "shuffle": self.shuffle,
                "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "num_windows": self.num_windows, "seq_len": self.seq_len,
                "shard_count": len(self.shards), "shard_tokens": sum(sh.token_count for sh in self.shards),
                "shard_fingerprint": self.shard_fingerprint}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for key in ("seed", "shuffle", "dp_size", "num_windows", "seq_len"):
            if key in sd and sd[key] != getattr(self, key):
                raise InputDataError(
                    f"loader state has {key}={sd[key]} but this run has {key}={getattr(self, key)}; "
                    "the data position cannot be resumed exactly with different data or layout"
                )
        # Window indices are positions in the shards' concatenated order: the same number of windows
        # over other shards (one swapped, added or removed) would resume at a silently shifted position.
        if "shard_fingerprint" in sd and sd["shard_fingerprint"] != self.shard_fingerprint:
            raise InputDataError(
                f"loader state was saved over {sd.get('shard_count', '?')} token shard(s) holding "
                f"{sd.get('shard_tokens', '?')} tokens (fingerprint {sd['shard_fingerprint']}) but this run "
                f"reads {len(self.shards)} shard(s) holding {sum(sh.token_count for sh in self.shards)} "
                f"tokens (fingerprint {self.shard_fingerprint}); shards were added, removed or changed, so "
                "the data position cannot be resumed exactly — resume with the original shards, or train "
                "in a new run"
            )
        self.close()
        self._pos = (int(sd["epoch"]), int(sd["offset"]))


def _fingerprint(shards: Sequence[TokenShardReader]) -> str:
    """Digest of the shards' order, file names and token counts (what window indices depend on); file
    names only, so the same data staged under another directory (an S3 cache) resumes."""
    import hashlib

    h = hashlib.sha256()
    for sh in shards:
        h.update(f"{sh.path.name}\0{sh.token_count}\0{sh.doc_count}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("KUBELLM_CACHE_DIR", Path.home() / ".cache" / "kubellm")) / "shards"


def stage_artifact_files(manifest: Any, prefixes: Sequence[str], cache_dir: str | Path | None = None,
                         fetch_here: bool = True) -> tuple[Path, list[str]]:
    """Make an artifact's files under `prefixes` (e.g. "train/", "tokenizer/") readable on this node.

    A local artifact is read in place (the shard reader validates header and size at open). An S3
    artifact is fetched (sha256-verified) into a node-local cache dir keyed by the manifest digest;
    only one process per node should fetch (`fetch_here`), the others wait at a barrier and read.
    Returns (local root, relative paths)."""
    from kubellm.core.manifest import fetch
    from kubellm.core.storage import is_s3, local_path

    paths = sorted(f.path for f in manifest.files if any(f.path.startswith(p) for p in prefixes))
    if not is_s3(manifest.uri):
        return local_path(manifest.uri), paths
    root = Path(cache_dir or default_cache_dir()) / manifest.digest()[:20]
    if fetch_here:
        missing = [p for p in paths if not (root / p).exists() or (root / p).stat().st_size != manifest.file(p).size]
        if missing:
            fetch(manifest, root, missing)
    return root, paths
