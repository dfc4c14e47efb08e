"""DPO numerics: hand-computed values, log 2 at the reference, IPO, cDPO."""

from __future__ import annotations

import math

import pytest
import torch

from kubellm.dpo.loss import preference_loss, sequence_logprobs


def test_equals_hand_computed_value() -> None:
    pc, pr = torch.tensor([-3.0]), torch.tensor([-5.0])
    rc, rr = torch.tensor([-4.0]), torch.tensor([-4.5])
    beta = 0.5
    # h = (-3 - -5) - (-4 - -4.5) = 2 - 0.5 = 1.5 ; loss = -log σ(0.75)
    expected = -math.log(1 / (1 + math.exp(-0.75)))
    loss, m = preference_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["reward_chosen"].item() == pytest.approx(0.5 * 1.0)
    assert m["reward_rejected"].item() == pytest.approx(0.5 * -0.5)
    assert m["reward_margin"].item() == pytest.approx(0.75)
    assert m["reward_accuracy"].item() == 1.0


def test_policy_equal_reference_gives_log2_and_zero_margin() -> None:
    lp = torch.randn(6)
    lr = torch.randn(6)
    loss, m = preference_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert m["reward_margin"].item() == 0.0


def test_label_smoothing_and_ipo() -> None:
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0])
    beta, eps = 1.0, 0.2  # h = 1
    loss, _ = preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    sig = 1 / (1 + math.exp(-1.0))
    assert loss.item() == pytest.approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig), rel=1e-6)
    one = torch.tensor([1])
    ipo, _ = preference_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo", chosen_tokens=one, rejected_tokens=one)
    assert ipo.item() == pytest.approx((1 - 1 / (2 * 0.25)) ** 2)


def test_ipo_regresses_the_per_token_gap() -> None:
    """IPO on summed log-probs compared a whole reply's gap with 1/(2β): a 200-token reply met it at once
    and a short one was pushed hard. Per token (the IPO authors' clarification, TRL's), the same per-token
    gap gives the same loss whatever the lengths."""
    beta = 0.1
    short = preference_loss(torch.tensor([-2.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-3.0]),
                            beta=beta, loss_type="ipo", chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([2]))
    long = preference_loss(torch.tensor([-200.0]), torch.tensor([-400.0]), torch.tensor([-300.0]),
                           torch.tensor([-300.0]), beta=beta, loss_type="ipo", chosen_tokens=torch.tensor([200]),
                           rejected_tokens=torch.tensor([200]))
    h = (-1.0 - -2.0) - (-1.5 - -1.5)  # per-token gap 1 in both
    assert short[0].item() == pytest.approx((h - 1 / (2 * beta)) ** 2) == pytest.approx(long[0].item())
    with pytest.raises(ValueError, match="give chosen_tokens and rejected_tokens"):
        preference_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]),
                        beta=beta, loss_type="ipo")


def test_sequence_logprobs_ignores_masked_positions() -> None:
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, 4, 5]])
    lp = torch.log_softmax(logits, -1)
    want0 = lp[0, 0, 1] + lp[0, 1, 2]
    want1 = lp[1, 0, 3] + lp[1, 2, 4] + lp[1, 3, 5]
    got = sequence_logprobs(logits, labels)
    assert torch.allclose(got, torch.stack([want0, want1]))
