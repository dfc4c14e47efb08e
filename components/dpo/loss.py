"""Preference losses: DPO (Rafailov et al. 2023), conservative DPO (label smoothing) and IPO.

All inputs are *sequence* log-probabilities (sum over the response tokens) of shape (B,); IPO also takes
each response's token count and regresses the gap of *per-token* log-probabilities (the IPO authors'
clarification, as TRL does: a summed gap made the regularisation depend on response length):

    loss, m = preference_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta=0.1)
    m["reward_accuracy"], m["reward_margin"]
    loss, m = preference_loss(..., loss_type="ipo", chosen_tokens=n_chosen, rejected_tokens=n_rejected)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kubellm.model.loss import sequence_logprobs as sequence_logprobs  # DPO's log-probs from logits


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean preference loss and detached metrics (rewards, accuracy, margin). IPO needs
    `chosen_tokens` / `rejected_tokens` (B,): the log-probs are divided by them first."""
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' averages log-probs per token: give chosen_tokens and rejected_tokens")
        nc, nr = chosen_tokens.clamp(min=1).to(policy_chosen.dtype), rejected_tokens.clamp(min=1).to(policy_chosen.dtype)
        policy_chosen, ref_chosen = policy_chosen / nc, ref_chosen / nc
        policy_rejected, ref_rejected = policy_rejected / nr, ref_rejected / nr
    # h = log-ratio of chosen over rejected under the policy, relative to the reference.
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        # label_smoothing ε: the preference label is wrong with probability ε (cDPO).
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        # IPO regresses the log-ratio gap to 1/(2β) instead of pushing it to infinity.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    metrics = {
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
    }
    return losses.mean(), metrics
