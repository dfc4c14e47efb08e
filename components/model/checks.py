"""Input checks the engine and generation call before a forward pass.

    from kubellm.model import check_token_ids
    check_token_ids(batch["input_ids"], cfg.vocab_size, where="train/shard-00003.tok")
"""

from __future__ import annotations

import torch

from kubellm.core.errors import InputDataError


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, where: str = "input") -> None:
    """Raise `InputDataError` naming `where`, the offending id and its position when any id is
    negative or >= `vocab_size` (an embedding lookup would otherwise fail with an opaque index error,
    or silently read garbage on some devices). One reduction each; call it at start-up or per batch."""
    if input_ids.numel() == 0:
        return
    hi, lo = int(input_ids.max()), int(input_ids.min())
    if hi < vocab_size and lo >= 0:
        return
    bad = (input_ids >= vocab_size) | (input_ids < 0)
    pos = tuple(int(i) for i in bad.nonzero()[0])
    value = int(input_ids[pos])
    raise InputDataError(
        f"{where}: token id {value} at position {list(pos)} is outside the model's vocabulary "
        f"[0, {vocab_size}) (max id {hi}, min id {lo}); the tokenizer's vocab must not exceed "
        f"model vocab_size={vocab_size}"
    )
