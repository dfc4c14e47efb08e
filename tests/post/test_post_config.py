"""SFT/DPO config refusals at the edge: each names the field and what is allowed."""

from __future__ import annotations

import pytest

from kubellm.core.errors import ConfigError
from kubellm.dpo.config import DPOConfig
from kubellm.runconfig import load_run_config


@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", "nan", ".nan"])
def test_non_finite_floats_are_refused(value: str) -> None:
    # before: dpo.beta=inf validated, was written as null into job.json and every worker failed there
    with pytest.raises(ConfigError, match=r"dpo\.beta: .*finite"):
        load_run_config(preset="debug", overrides=[f"dpo.beta={value}"])
    with pytest.raises(ConfigError, match=r"sft\.train\.optim\.grad_clip: .*finite"):
        load_run_config(preset="debug", overrides=[f"sft.train.optim.grad_clip={value}"])


def test_finite_config_round_trips_through_json() -> None:
    cfg = load_run_config(preset="debug", overrides=["dpo.beta=0.5"])
    assert DPOConfig.model_validate_json(cfg.dpo.model_dump_json()) == cfg.dpo


def test_ipo_refuses_label_smoothing_naming_both() -> None:
    # before: IPO silently ignored label_smoothing
    with pytest.raises(ConfigError, match=r"dpo: .*label_smoothing=0\.3 has no effect with loss_type='ipo'"):
        load_run_config(preset="debug", overrides=["dpo.loss_type=ipo", "dpo.label_smoothing=0.3"])
    assert load_run_config(preset="debug", overrides=["dpo.loss_type=ipo"]).dpo.label_smoothing == 0
    assert load_run_config(preset="debug", overrides=["dpo.label_smoothing=0.3"]).dpo.loss_type == "sigmoid"
