"""Causal LM loss.

    from kubellm.model.loss import causal_lm_loss
    loss = causal_lm_loss(model(input_ids), labels)   # labels[t] is the target for position t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy over labels != ignore_index, computed in fp32 (bf16 logits lose the
    log-sum-exp's precision). Labels are already shifted by the caller. Returns 0 (with a graph) when
    every label is ignored, instead of NaN, so an all-masked micro-batch cannot poison training."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (flat_labels != ignore_index).sum().clamp(min=1)
    return total / count
