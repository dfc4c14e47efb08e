"""Skip (or stop on) bad optimizer steps — NaN/Inf losses and loss spikes — consistently on every rank.

    guard = StepGuard(train_cfg.nonfinite, train_cfg.spike_sigma, train_cfg.spike_window, world)
    verdict = guard.check_loss(loss_sum / accum, step)   # collective, before the step's last backward
    if verdict:                                          # "nonfinite" | "spike" ("stop" policy raises)
        skip_update(engine, loss, zero_stage)            # instead of backward + engine.step()

Why before the last backward: DeepSpeed reduces gradients inside `engine.backward` at the
accumulation boundary and applies the update in `engine.step()`; deciding after the forward of the
boundary micro-batch lets every rank take the same branch (the decision uses one all-reduced number,
the step's mean loss, which is non-finite on every rank as soon as it is on one).

How a step is skipped (the parameters, the optimizer state and the LR schedule stay as they were;
DeepSpeed's `skipped_steps` counter goes up, as for an fp16 overflow):
* ZeRO ≥ 1: DeepSpeed's own overflow path. The ZeRO optimizers treat a non-finite gradient norm as an
  overflow in every precision: they skip the update and clear their partitioned gradient buffers.
  We make the boundary's gradients non-finite (backward of `loss × NaN`) so that path runs.
* ZeRO 0: the plain (fused) AdamW has no overflow check, so for this one `engine.step()` the
  optimizer's `step` is shadowed by a no-op and `optimizer.overflow = True` tells DeepSpeed's
  `_take_model_step` to count a skipped step and hold the LR schedule; it still zeroes the gradients.

A non-finite gradient norm with a finite loss is caught too: with ZeRO 0 from the all-reduced
gradients before `engine.step()` (`check_grad_norm`; with TP/PP one global norm over every rank,
`gradients.model_parallel_grad_norm`), with ZeRO ≥ 1 and with DeepSpeed's bf16/fp16 optimizer wrappers
(the CUDA path, any ZeRO stage) by DeepSpeed itself inside `step()` (seen afterwards as a rise in
`engine.skipped_steps` or a non-finite norm, `note_deepspeed_skip`).

With pipeline parallelism DeepSpeed's `train_batch` runs the backwards and the update itself; the
same checks run inside it, before the update (`PipelineStepGuard`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from kubellm.model.parallel import collective_device
from kubellm.training.gradients import clip_model_parallel, deepspeed_checks_step

NONFINITE = "nonfinite"
SPIKE = "spike"
OVERFLOW = "overflow"
SPIKE_RUN_LIMIT = 10
"""Spike skips with no applied step between them after which the run stops (a skip for a
non-finite loss or an fp16 overflow does not end the run of spikes): a loss that stays above the threshold
is a shift (new data, a diverging run), not a spike, and skipping it would leave the weights frozen
for the rest of the run."""


class StepGuard:
    """Per-run bookkeeping: the rolling window of accepted step losses and the skip counters."""

    def __init__(self, nonfinite: str = "stop", spike_sigma: float | None = None, spike_window: int = 50,
                 world: int = 1) -> None:
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"train.nonfinite={nonfinite!r}: expected skip or stop")
        self.policy, self.sigma, self.window_size, self.world = nonfinite, spike_sigma, spike_window, world
        self.window: list[float] = []
        self.skipped = {NONFINITE: 0, SPIKE: 0, OVERFLOW: 0}
        self.spike_run = 0  # spikes skipped since the last applied step

    # -- decisions
    def check_loss(self, local_mean_loss: torch.Tensor, step: int) -> str | None:
        """Collective. The reason to skip this step (None = go on), identical on every rank."""
        value = local_mean_loss.detach().to(collective_device(), torch.float64).reshape(1).clone()
        if self.world > 1:
            dist.all_reduce(value)  # one NaN/Inf on any rank makes the sum non-finite everywhere
        loss = float(value[0]) / self.world
        if not math.isfinite(loss):
            return self._nonfinite(f"loss is {loss} at step {step}")
        if self.sigma and len(self.window) >= self.window_size:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            threshold = mean + self.sigma * max(std, 1e-12)
            if loss > threshold:
                if self.spike_run >= SPIKE_RUN_LIMIT:
                    raise FloatingPointError(
                        f"loss {loss:.4g} at step {step} is above the spike threshold {threshold:.4g} (mean "
                        f"{mean:.4g} + {self.sigma} σ of the last {len(self.window)} applied steps) for the "
                        f"{self.spike_run + 1}th time with no applied step between: a lasting shift, not a spike, and skipping "
                        "it would freeze the weights for the rest of the run; stopping before the "
                        "optimizer step, so the last committed checkpoint is intact. Check the data "
                        "and optim.lr, or raise (or unset) train.spike_sigma")
                self.spike_run += 1
                self.skipped[SPIKE] += 1
                return SPIKE
        return None

    def check_grad_norm(self, grad_norm: float, step: int) -> str | None:
        """ZeRO 0: the all-reduced gradient norm is the same on every rank, so no collective."""
        return None if math.isfinite(grad_norm) else self._nonfinite(f"gradient norm is {grad_norm} at step {step}")

    def note_deepspeed_skip(self, step: int, fp16: bool = False) -> None:
        """DeepSpeed skipped a step on its own (non-finite gradient norm): count it, or stop. Under
        fp16 that is the dynamic loss scaler's overflow, routine while it searches for its scale (it
        halves the scale and goes on, and raises itself once at its minimum): counted as
        `skipped_overflow`, never stopped on."""
        if fp16:
            self.skipped[OVERFLOW] += 1
            return
        self._nonfinite(f"gradient norm is not finite at step {step} (DeepSpeed skipped the update)")

    def _nonfinite(self, what: str) -> str:
        if self.policy == "stop":
            raise FloatingPointError(
                f"{what}; stopping before the optimizer step, so the last committed checkpoint is "
                "intact (train.nonfinite=stop). Lower optim.lr, check the data, or set "
                "train.nonfinite=skip to skip and count such steps")
        self.skipped[NONFINITE] += 1
        return NONFINITE

    def accept(self, step_loss: float) -> None:
        """An applied step: its loss joins the rolling window of the spike test."""
        self.window = (self.window + [step_loss])[-self.window_size:]
        self.spike_run = 0

    # -- metrics and resume
    def metrics(self) -> dict[str, float]:
        return {f"skipped_{k}": float(v) for k, v in self.skipped.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "skipped": dict(self.skipped), "spike_run": self.spike_run}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.window = [float(x) for x in sd.get("window", [])][-self.window_size:]
        self.skipped.update({k: int(v) for k, v in sd.get("skipped", {}).items()})
        self.spike_run = int(sd.get("spike_run", 0))


@contextlib.contextmanager
def optimizer_step_skipped(optimizer: Any) -> Iterator[None]:
    """For one `engine.step()`: the optimizer's step does nothing and reports an overflow."""
    had_overflow, old = hasattr(optimizer, "overflow"), getattr(optimizer, "overflow", None)
    # an instance attribute already there (torch's LR scheduler wraps `optimizer.step` in one) is put back
    own_step = optimizer.__dict__.get("step")
    optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the bound method
    optimizer.overflow = True  # _take_model_step: skipped_steps += 1, LR schedule not advanced
    try:
        yield
    finally:
        if own_step is not None:
            optimizer.step = own_step
        else:
            del optimizer.step
        if had_overflow:
            optimizer.overflow = old
        else:
            del optimizer.overflow


def skip_update(engine: Any, loss: torch.Tensor, zero_stage: int) -> None:
    """Finish the accumulation boundary without changing parameters or optimizer state.

    Called instead of `engine.backward(loss); engine.step()` for the boundary micro-batch; every
    rank calls it (the backward still joins the gradient all-reduce/reduce-scatter)."""
    if zero_stage == 0:
        engine.backward(loss)
        with optimizer_step_skipped(engine.optimizer):
            engine.step()
    else:
        engine.backward(loss * float("nan"))  # non-finite grads -> the ZeRO optimizer's overflow path
        engine.step()


def poison_gradients(engine: Any) -> None:
    """ZeRO ≥ 1 under pipeline parallelism (the backwards already ran inside `train_batch`): make this
    rank's accumulated gradients non-finite before DeepSpeed reduces them, so the ZeRO optimizer's
    overflow path skips the update (the pipeline counterpart of `skip_update`'s `loss × NaN`)."""
    for p in engine.module.parameters():
        for g in (p.grad, getattr(p, "_hp_grad", None)):
            if g is not None:
                g.mul_(float("nan"))


def skip_boundary_step(engine: Any) -> None:
    """ZeRO 0, gradients already reduced (non-finite norm found after backward): skip the update."""
    with optimizer_step_skipped(engine.optimizer):
        engine.step()


class PipelineStepGuard:
    """pp > 1: the StepGuard inside DeepSpeed's `train_batch`, before its update is applied.

    DeepSpeed's pipeline schedule ends every step with ReduceTiedGrads, ReduceGrads, OptimizerStep
    on every stage; this swaps two of those instructions (on this engine instance only):
    * ReduceTiedGrads: all forwards and backwards are done, the last stage holds the step's loss.
      It is broadcast over the pipe group and `guard.check_loss` runs on every rank (same verdict);
      "stop" raises here. To skip with ZeRO ≥ 1 the local gradients are made non-finite before they
      are reduced, so ZeRO's overflow path skips the update (as `skip_update` does without pp).
    * OptimizerStep: with ZeRO 0 (no DeepSpeed bf16/fp16 wrapper) the gradients are reduced over dp
      and tied copies; their global norm (`model_parallel_grad_norm`) goes to `check_grad_norm` and
      clips every stage's gradients (`grad_clip`, `clip_model_parallel`; DeepSpeed's own clip would use the
      first stage's norm), and a skipped step runs the optimizer step as a no-op
      (`optimizer_step_skipped`: LR schedule held).
    """

    def __init__(self, engine: Any, guard: StepGuard, zero_stage: int, tp_rank: int, dp_size: int,
                 grad_clip: float = 0.0) -> None:
        from deepspeed.runtime.pipe import schedule

        self.engine, self.guard, self.zero_stage, self.grad_clip = engine, guard, zero_stage, grad_clip
        self.tp_rank, self.dp_size = tp_rank, dp_size
        self.own_norm = not deepspeed_checks_step(engine, zero_stage)
        self.step = 0
        self.verdict: str | None = None
        self.grad_norm = 0.0
        table = dict(type(engine)._INSTRUCTION_MAP)
        real_tied, real_opt = table[schedule.ReduceTiedGrads], table[schedule.OptimizerStep]
        me = self

        def reduce_tied_grads(eng: Any, **kw: Any) -> None:
            me._check_loss()
            real_tied(eng, **kw)

        def optimizer_step(eng: Any, **kw: Any) -> None:
            if me.own_norm and not me.verdict:
                me.grad_norm = clip_model_parallel(eng, me.tp_rank, me.dp_size, me.grad_clip)
                me.verdict = me.guard.check_grad_norm(me.grad_norm, me.step)
            if me.verdict and me.zero_stage == 0:
                with optimizer_step_skipped(eng.optimizer):
                    real_opt(eng, **kw)
            else:
                real_opt(eng, **kw)

        table[schedule.ReduceTiedGrads] = reduce_tied_grads
        table[schedule.OptimizerStep] = optimizer_step
        engine._INSTRUCTION_MAP = table  # the instance's map; PipelineEngine binds each entry to itself

    def begin(self, step: int) -> None:
        self.step, self.verdict, self.grad_norm = step, None, 0.0

    def _check_loss(self) -> None:
        eng = self.engine
        loss = torch.zeros(1, dtype=torch.float64, device=collective_device())
        if eng.is_last_stage():
            loss[0] = float(eng.total_loss) / eng.gradient_accumulation_steps()
        if eng.num_stages > 1:
            src = eng.grid.stage_to_global(eng.num_stages - 1)
            dist.broadcast(loss, src=src, group=eng.grid.get_pipe_parallel_group())
        self.verdict = self.guard.check_loss(loss, self.step)  # collective; "stop" raises
        if self.verdict and self.zero_stage > 0:
            poison_gradients(eng)
