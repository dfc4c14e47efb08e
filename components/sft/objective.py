"""The SFT objective for the shared engine: packed chat sequences, loss on assistant tokens only.

    obj = SFTObjective(packs)                       # from kubellm.sft.data.pack_examples
    train(model_cfg, train_cfg, parallel_cfg, obj, run_dir, init_state_dict=base_weights)

`ExampleLoader` is the in-memory loader both SFT and DPO use: a seeded shuffle per epoch, rank r of
n takes every n-th micro-batch (no overlap), and its position (epoch, batch index) is exact for resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kubellm.core.errors import ConfigError
from kubellm.sft.data import IGNORE, PackedSequence
from kubellm.training.data import collate


class ExampleLoader:
    """Endless micro-batches of fixed-shape examples (dicts of equal-length int arrays)."""

    def __init__(self, examples: Sequence[dict[str, np.ndarray]], dp_rank: int, dp_size: int,
                 micro_batch_size: int, seed: int, what: str = "examples") -> None:
        per_step = dp_size * micro_batch_size
        if len(examples) < per_step:
            raise ConfigError(
                f"{len(examples)} {what} cannot fill one micro-batch on each of {dp_size} rank(s) "
                f"(micro_batch_size={micro_batch_size}); add data or lower train.micro_batch_size"
            )
        self.examples = examples
        self.rank, self.size, self.micro, self.seed = dp_rank, dp_size, micro_batch_size, seed
        self.batches_per_epoch = len(examples) // per_step  # the remainder is dropped each epoch
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        """This epoch's shuffled order, drawn once per epoch (not per micro-batch: O(examples) each)."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples)))
        return self._cached[1]

    def __iter__(self) -> ExampleLoader:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
        start = (self.index * self.size + self.rank) * self.micro
        rows = [self.examples[i] for i in order[start : start + self.micro]]
        self.index += 1
        return collate(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])


def packs_to_arrays(packs: Sequence[PackedSequence]) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": np.asarray(p.input_ids, dtype=np.int64),
             "labels": np.asarray(p.labels, dtype=np.int64),
             "doc_ids": np.asarray(p.doc_ids, dtype=np.int64),
             "position_ids": np.asarray(p.position_ids, dtype=np.int64)} for p in packs]


def real_tokens(input_ids: Tensor, pad_id: int | None) -> int:
    """Positions that hold a token rather than padding (`pad_id` None: there is no padding). Special-
    token strings in chat text are encoded as plain text, so the pad id appears only as padding."""
    return int(input_ids.numel() if pad_id is None else (input_ids != pad_id).sum())


class SFTObjective:
    """`pad_id`: the id packs are padded with; padding is not counted in tokens/s, `tokens_seen` or MFU."""

    def __init__(self, packs: Sequence[PackedSequence], pad_id: int | None = None) -> None:
        self.examples = packs_to_arrays(packs)
        self.pad_id = pad_id

    def build_loader(self, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int) -> ExampleLoader:
        return ExampleLoader(self.examples, dp_rank, dp_size, micro_batch_size, seed, "packed sequences")

    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # packs carry doc_ids/position_ids (document-causal attention); rows of one conversation each
        # may leave them out (plain causal attention, as DPO's pairs)
        loss = model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                     labels=batch["labels"], ignore_index=IGNORE)  # fused LM-head cross-entropy
        return loss, {}

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return real_tokens(batch["input_ids"], self.pad_id)

    def target_tokens(self, batch: dict[str, Tensor]) -> int:
        """Assistant tokens (labels set): the loss is their mean, so the engine weights each
        micro-batch by them and a step's loss is the mean over every assistant token in the step."""
        return int((batch["labels"] != IGNORE).sum())
