"""The evaluation_report pipeline judges but never moves the promoted pointer: its evaluate section's
gate.promote is false in the compiled default, a --param/--arg that asks for promotion is refused,
and the component turns promotion off whatever the parameter says (a UI edit passes no CLI check)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubellm.core.errors import ConfigError
from kubellm.pipelines import runtime
from kubellm.pipelines.definitions import PipelineSettings, check_arguments, parameter_defaults
from kubellm.runconfig import load_run_config


def _promote(text: str) -> bool:
    return bool(runtime.parse_section("evaluate", text).gate.promote)  # as the component reads it


def test_a_param_evaluate_config_promotes_in_the_training_pipeline_only() -> None:
    cfg = load_run_config(None, preset="debug")
    partial = json.dumps({"limit": 3, "gate": {"promote": True}})  # merged over the run-config's section
    d = parameter_defaults(cfg, PipelineSettings(params=(("evaluate_config", partial),)))
    assert _promote(d["llm_from_scratch"]["evaluate_config"])
    assert not _promote(d["evaluation_report"]["evaluate_config"])
    assert json.loads(d["evaluation_report"]["evaluate_config"])["limit"] == 3


@pytest.mark.parametrize("value", [{"gate": {"promote": True}}, {"limit": 2, "gate": {"promote": True}},
                                   "gate: {promote: true}"])
def test_a_report_argument_that_would_promote_is_refused(value: Any) -> None:
    defaults = parameter_defaults(load_run_config(None, preset="debug"), PipelineSettings())["evaluation_report"]
    with pytest.raises(ConfigError, match="--arg evaluate_config: the evaluation_report pipeline never promotes"):
        check_arguments("evaluation_report", {"evaluate_config": value}, defaults, "--arg")
    ok = check_arguments("evaluation_report", {"evaluate_config": {"gate": {"promote": False}}}, defaults, "--arg")
    assert not _promote(ok["evaluate_config"])
    # a partial section keeps the report's gate.promote false (merged, not reset to the schema's true)
    ok = check_arguments("evaluation_report", {"evaluate_config": {"limit": 2}}, defaults, "--arg")
    assert not _promote(ok["evaluate_config"]) and json.loads(ok["evaluate_config"])["limit"] == 2


def test_the_report_component_never_promotes(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    seen: list[Any] = []

    class Done(Exception):
        pass

    def fake_run_stage(stage: str, config: Any, inputs: Any, root: str) -> Any:
        seen.append(("run_stage", config))
        raise Done

    def fake_evaluate(config: Any, inputs: Any, root: str, *, apply_gate: bool = True) -> Any:
        seen.append((f"evaluate(apply_gate={apply_gate})", config))
        raise Done

    import kubellm.evaluate.stage
    import kubellm.stages

    monkeypatch.setattr(kubellm.stages, "run_stage", fake_run_stage)
    monkeypatch.setattr(kubellm.evaluate.stage, "run", fake_evaluate)
    text = json.dumps({"gate": {"promote": True}})
    for defer in (False, True):  # the components run with defer_gate=True
        for never, expected in ((True, False), (False, True)):
            with pytest.raises(Done):
                runtime.run_component("evaluate", text, str(tmp_path), {}, {}, never_promote=never, defer_gate=defer)
            assert seen[-1][0] == ("evaluate(apply_gate=False)" if defer else "run_stage")
            assert seen[-1][1].gate.promote is expected
