"""StepGuard's single-process rules: lasting spikes stop the run, fp16 overflows are counted, not
stopped on, and a skipped ZeRO-0 step leaves the optimizer as the LR scheduler wrapped it."""

from __future__ import annotations

import pytest
import torch

from kubellm.training.stepguard import SPIKE, SPIKE_RUN_LIMIT, StepGuard, optimizer_step_skipped


def _warm(guard: StepGuard, n: int = 4) -> None:
    for i in range(n):
        guard.accept(1.0 + 0.01 * (i % 2))  # mean 1.005, std 0.005


def test_a_lasting_spike_stops_the_run_instead_of_freezing_the_weights() -> None:
    guard = StepGuard("skip", spike_sigma=3.0, spike_window=4)
    _warm(guard)
    for step in range(SPIKE_RUN_LIMIT):  # a shift to 2.0 in the loss: skipped, as spikes, up to the limit
        assert guard.check_loss(torch.tensor(2.0), step) == SPIKE
    with pytest.raises(FloatingPointError, match=r"11th time with no applied step between: a lasting shift, not a spike.*spike_sigma"):
        guard.check_loss(torch.tensor(2.0), SPIKE_RUN_LIMIT)
    assert guard.metrics()["skipped_spike"] == SPIKE_RUN_LIMIT


def test_an_applied_step_ends_a_run_of_spikes_and_resume_keeps_the_count() -> None:
    guard = StepGuard("skip", spike_sigma=3.0, spike_window=4)
    _warm(guard)
    for step in range(SPIKE_RUN_LIMIT - 1):
        assert guard.check_loss(torch.tensor(2.0), step) == SPIKE
    resumed = StepGuard("skip", spike_sigma=3.0, spike_window=4)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.check_loss(torch.tensor(2.0), 9) == SPIKE  # the 10th: still skipped
    with pytest.raises(FloatingPointError):  # the 11th, after the resume, stops as without one
        resumed.check_loss(torch.tensor(2.0), 10)
    guard.accept(1.0)  # an applied step in between: a new run of spikes starts from zero
    for step in range(SPIKE_RUN_LIMIT):
        assert guard.check_loss(torch.tensor(2.0), step) == SPIKE


def test_fp16_overflow_is_counted_not_stopped_on() -> None:
    guard = StepGuard("stop")
    guard.note_deepspeed_skip(5, fp16=True)
    assert guard.metrics() == {"skipped_nonfinite": 0.0, "skipped_spike": 0.0, "skipped_overflow": 1.0}
    with pytest.raises(FloatingPointError, match="gradient norm is not finite at step 6"):
        guard.note_deepspeed_skip(6)  # outside fp16 a DeepSpeed skip is a non-finite gradient: stop


def test_a_skipped_step_keeps_the_lr_schedulers_step_wrapper() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # wraps opt.step in an instance attribute
    wrapper = opt.__dict__["step"]
    with optimizer_step_skipped(opt):
        w.grad = torch.ones(2)
        opt.step()
    assert torch.equal(w.detach(), torch.ones(2))  # the skipped step changed nothing
    assert opt.__dict__["step"] is wrapper and not hasattr(opt, "overflow")
    opt.step()
    assert torch.allclose(w.detach(), torch.full((2,), 0.9))
    plain = torch.optim.SGD([w], lr=0.1)  # no instance attribute before: none after
    with optimizer_step_skipped(plain):
        pass
    assert "step" not in plain.__dict__
