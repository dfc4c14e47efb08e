"""The DPO objective for the shared engine.

    obj = DPOObjective(arrays, beta=0.1, reference=frozen_sft_model)        # live reference
    precompute_reference(frozen_sft_model, arrays); obj = DPOObjective(arrays, beta=0.1)  # cached

Each example holds chosen and rejected as rows of (2, T) arrays; one forward pass scores both.
The live reference is a frozen full copy of the starting model on every rank (not ZeRO-partitioned:
fine for the sizes SFT/DPO run at here; use cached reference log-probs for larger models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kubellm.dpo.loss import preference_loss
from kubellm.sft.data import IGNORE
from kubellm.sft.objective import ExampleLoader, real_tokens
from kubellm.training.data import collate


def _flat(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    # (B, 2, T) -> (2B, T): first B rows chosen, next B rejected
    ids, labels = batch["input_ids"], batch["labels"]
    return ids.transpose(0, 1).reshape(-1, ids.shape[-1]), labels.transpose(0, 1).reshape(-1, labels.shape[-1])


def policy_logprobs(model: Any, ids: Tensor, labels: Tensor) -> Tensor:
    """(B,) summed log p(labels) of each row of a kubellm `Transformer` (or its DeepSpeed engine):
    the LM head's chunked sequence log-probs (`model(ids, labels=..., sequence_logprobs=True)`), so
    no (B, T, vocab) logits; the same values as `sequence_logprobs(model(ids), labels)`."""
    return model(ids, labels=labels, sequence_logprobs=True)


@torch.no_grad()
def reference_logprobs(reference: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    ids, labels = _flat(batch)
    lp = policy_logprobs(reference, ids, labels)
    b = batch["input_ids"].shape[0]
    return lp[:b], lp[b:]


def precompute_reference(reference: torch.nn.Module, arrays: Sequence[dict[str, np.ndarray]],
                         batch_size: int = 16) -> None:
    """Add `ref_logps` (chosen, rejected) to every example, computed once with the frozen model."""
    reference.eval()
    device = next(reference.parameters()).device
    for i in range(0, len(arrays), batch_size):
        rows = arrays[i : i + batch_size]
        b = {k: v.to(device) for k, v in collate(rows, ("input_ids", "labels")).items()}
        c, r = reference_logprobs(reference, b)
        both = torch.stack([c, r], dim=1).double().cpu().numpy()  # one device-to-host copy per batch
        for j, row in enumerate(rows):
            row["ref_logps"] = both[j]


class DPOObjective:
    def __init__(self, arrays: Sequence[dict[str, np.ndarray]], beta: float, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", reference: torch.nn.Module | None = None,
                 pad_id: int | None = None) -> None:
        """`pad_id`: the id pairs are padded with; padding is not counted in tokens/s, `tokens_seen` or MFU."""
        cached = all("ref_logps" in a for a in arrays)
        if reference is None and not cached:
            raise ValueError("DPO needs a live reference model or precomputed reference log-probs")
        self.examples, self.beta, self.ls, self.loss_type = arrays, beta, label_smoothing, loss_type
        self.pad_id = pad_id
        self.reference = None if cached else reference
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)

    def build_loader(self, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int) -> ExampleLoader:
        return ExampleLoader(self.examples, dp_rank, dp_size, micro_batch_size, seed, "preference pairs")

    def loss(self, model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids, labels = _flat(batch)
        lp = policy_logprobs(model, ids, labels)
        b = batch["input_ids"].shape[0]
        if self.reference is not None:
            self.reference.to(ids.device)
            ref_c, ref_r = reference_logprobs(self.reference, batch)
        else:
            ref = batch["ref_logps"].to(lp.dtype)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        n = (labels != IGNORE).sum(-1)  # response tokens of each row (IPO averages per token)
        return preference_loss(lp[:b], lp[b:], ref_c, ref_r, beta=self.beta, label_smoothing=self.ls,
                               loss_type=self.loss_type, chosen_tokens=n[:b], rejected_tokens=n[b:])  # type: ignore[arg-type]

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return real_tokens(batch["input_ids"], self.pad_id)
