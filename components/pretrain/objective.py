"""The pretraining objective: next-token loss on packed `seq_len + 1` windows of the token shards.

    obj = PretrainObjective(shard_paths, seq_len=128, vocab_size=cfg.vocab_size)
    train(model_cfg, train_cfg, parallel_cfg, obj, run_dir)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from kubellm.training.data import PackedWindowLoader, open_shards


class PretrainObjective:
    def __init__(self, shard_paths: Sequence[str | Path], *, seq_len: int, vocab_size: int,
                 doc_masking: bool = False, shuffle: bool = True, prefetch: int = 4, rank: int = 0,
                 world: int = 1) -> None:
        # validate every shard (header, size, offsets, ids < vocab) now: bad data fails at start-up; the
        # whole-shard scans are split between the job's `world` ranks (collective when world > 1)
        self.shards = open_shards(shard_paths, vocab_size, rank=rank, world=world)
        self.seq_len, self.doc_masking, self.shuffle, self.prefetch = seq_len, doc_masking, shuffle, prefetch

    def build_loader(self, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int) -> PackedWindowLoader:
        return PackedWindowLoader(self.shards, seq_len=self.seq_len, micro_batch_size=micro_batch_size,
                                  dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=self.shuffle,
                                  doc_masking=self.doc_masking, prefetch=self.prefetch)

    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                     labels=batch["labels"])  # the LM head's fused cross-entropy (no (B, T, V) logits)
        return loss, {}

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["labels"].numel())
