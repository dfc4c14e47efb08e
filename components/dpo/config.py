"""DPO stage config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubellm.core.config import StrictModel
from kubellm.training.config import LaunchConfig, OptimConfig, ParallelConfig, TrainConfig


def _train() -> TrainConfig:
    return TrainConfig(max_steps=30, micro_batch_size=8, global_batch_size=16, seq_len=128,
                       optim=OptimConfig(lr=2e-4, warmup_steps=2, weight_decay=0.0))


class DPOConfig(StrictModel):
    beta: float = Field(default=0.1, gt=0)
    """DPO temperature on the policy/reference log-ratio."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (with label_smoothing > 0: conservative DPO); ipo: IPO, on per-token log-probs (each
    reply's summed log-prob over its length, as TRL does)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """cDPO: probability that a preference label is flipped (loss_type sigmoid only; refused with ipo)."""
    reference: Literal["cached", "live"] = "cached"
    """cached: reference log-probs computed once with the frozen starting model (on the training device,
    in the training precision) and stored in the run dir (`reference/ref_logps-<key>.npy`, keyed on
    model, tokenized pairs, device and precision); live: a frozen copy scores every batch."""
    on_bad_record: Literal["skip", "fail"] = "skip"
    """Identical chosen/rejected, empty prompt, a prompt that is not text or a messages list (or whose
    messages start or end with an assistant turn), malformed or longer than train.seq_len: skip and
    count, or fail the stage naming file and line."""
    heldout_every: int = Field(default=10, ge=2)
    """One usable pair in N (the 1st, the (N+1)-th, …) is held out of training: the report shows the trained policy's loss,
    reward accuracy and margin on those pairs (at the start, where the policy is the reference, the
    rewards are 0 and the sigmoid loss is log 2) next to the same on the pairs it trained on."""
    train: TrainConfig = Field(default_factory=_train)
    """Optimisation, batch, precision, ZeRO, checkpoints."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """dp × tp × pp layout."""
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Where and how many processes."""

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> DPOConfig:
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError(f"label_smoothing={self.label_smoothing} has no effect with loss_type='ipo' "
                             "(it is conservative DPO, for loss_type='sigmoid'); set label_smoothing=0 "
                             "or loss_type=sigmoid")
        return self
