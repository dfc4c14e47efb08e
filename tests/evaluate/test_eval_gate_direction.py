"""Which way a metric is better comes from lm-eval's per-task `higher_is_better` (kubellm's own only for
held-out perplexity): a worse `ter` or `brier_score` fails max_drop and a better one passes; a filtered
metric (`exact_match/strict-match`) takes its metric's direction; a max_drop rule on a metric whose
direction is unknown fails the gate naming it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from evalkit import FakeHarness, eval_config

from kubellm.core.storage import storage_for
from kubellm.evaluate import stage
from kubellm.evaluate.config import GateRule
from kubellm.evaluate.registry import Promoted, Registry, judge

LM_EVAL_DIRECTIONS = {"wmt": {"ter": False, "bleu": True}, "brier": {"brier_score": False},
                      "gsm": {"exact_match": True}, "odd": {"score": None}}


def _base(scores: dict) -> Promoted:
    return Promoted(name="kubellm", model_uri="/m/base", model_digest="d" * 64, label="base", scores=scores)


@pytest.mark.parametrize(("task", "metric", "before", "after", "passed"), [
    ("wmt", "ter", 50.0, 80.0, False),           # translation error rate rose: worse
    ("wmt", "ter", 50.0, 40.0, True),            # fell: better
    ("brier", "brier_score", 0.2, 0.5, False),   # calibration error rose: worse
    ("brier", "brier_score", 0.5, 0.2, True),
    ("wmt", "bleu", 30.0, 20.0, False),          # higher-is-better still drops
    ("gsm", "exact_match/strict-match", 0.6, 0.4, False),   # filtered name: exact_match's direction
    ("gsm", "exact_match/strict-match", 0.4, 0.6, True),
])
def test_max_drop_follows_lm_eval_direction(task: str, metric: str, before: float, after: float,
                                            passed: bool) -> None:
    rules = {task: GateRule(metric=metric, max_drop=0.05)}
    v = judge({task: {metric: after}}, _base({task: {metric: before}}), rules, {}, directions=LM_EVAL_DIRECTIONS)
    assert [c.kind for c in v.checks] == ["max_drop"] and v.passed is passed
    msg = v.checks[0].describe()
    assert ("(worse)" in msg) is (not passed) and ("(better)" in msg) is passed


def test_perplexity_keeps_kubellm_direction() -> None:
    rules = {"perplexity": GateRule(max_drop=1.0)}
    base = _base({"perplexity": {"perplexity": 40.0}})
    assert not judge({"perplexity": {"perplexity": 45.0}}, base, rules, {"perplexity": "perplexity"}).passed
    assert judge({"perplexity": {"perplexity": 35.0}}, base, rules, {"perplexity": "perplexity"}).passed


@pytest.mark.parametrize(("task", "metric"), [("odd", "score"), ("unreported", "acc"), ("perplexity", "tokens")])
def test_max_drop_on_a_metric_of_unknown_direction_is_refused(task: str, metric: str) -> None:
    """A failed check naming the rule (the report of the finished evaluation still publishes), not an
    exception after every model was evaluated."""
    rules = {task: GateRule(metric=metric, max_drop=0.1)}
    v = judge({task: {metric: 1.0}}, _base({task: {metric: 1.0}}), rules, {}, directions=LM_EVAL_DIRECTIONS)
    assert not v.passed and [c.kind for c in v.failures] == ["direction"]
    assert re.search(rf"evaluate.gate.rules.{task}: max_drop on metric '{metric}', but lm-eval reports no "
                     r"direction .*use an absolute min or max", v.failures[0].describe())
    # absolute bounds need no direction
    assert judge({task: {metric: 1.0}}, None, {task: GateRule(metric=metric, min=0.5)}, {},
                 directions=LM_EVAL_DIRECTIONS).passed


def test_stage_passes_lm_eval_directions_to_the_gate(hf_exports, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the stage: a candidate whose ter rose from 50 to 80 is not promoted, one whose ter fell is."""
    FakeHarness({"a": {"wmt": {"ter": 50.0, "ter_stderr": 1.0}}, "b": {"wmt": {"ter": 80.0, "ter_stderr": 1.0}}},
                directions={"wmt": {"ter": False}}).install(monkeypatch)
    root = str(tmp_path / "art")
    cfg = eval_config(tasks=["wmt"], chat_tasks=[], gate={"rules": {"wmt": {"metric": "ter", "max_drop": 5.0}}})
    stage.run(cfg, {"models": str(hf_exports["a"])}, root)  # first promotion: ter 50
    reg = Registry(f"{root}/registry", "kubellm")
    assert reg.current().entry.label == "a"
    from kubellm.evaluate.registry import GateFailedError

    with pytest.raises(GateFailedError, match=r"wmt ter 80.0000 vs baseline 50.0000: rose \(worse\) by 30.0000"):
        stage.run(cfg, {"models": str(hf_exports["b"])}, root)
    assert reg.current().entry.label == "a"
    [failed] = [p for p in Path(root, "evaluate").rglob("results.json")
                if json.loads(p.read_text())["models"][0]["label"] == "b"]
    assert json.loads(failed.read_text())["tasks"]["wmt"]["higher_is_better"] == {"ter": False}
    # the other way round: b promoted at 80, a (50) is an improvement and passes
    reg2 = str(tmp_path / "art2")
    stage.run(cfg, {"models": str(hf_exports["b"])}, reg2)
    m = stage.run(cfg, {"models": str(hf_exports["a"])}, reg2)
    assert m.metrics["gate_passed"] == 1.0
    assert Registry(f"{reg2}/registry", "kubellm").current().entry.label == "a"
    assert storage_for(m.uri).exists(m.file_uri("report.html"))


def test_a_rule_metric_is_resolved_or_refused_after_the_first_model(hf_exports, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A standard task's metric names are known only from its results: a rule's typo fails after the first
    model (not after every model, with nothing published), and a bare metric lm-eval reports under one
    filter (triviaqa's exact_match/remove_whitespace) is that one, as for headlines."""
    from kubellm.core.errors import ConfigError

    got = {"exact_match/remove_whitespace": 0.4, "exact_match/remove_whitespace_stderr": 0.01}
    fake = FakeHarness({"a": {"triviaqa": got}, "b": {"triviaqa": got}},
                       directions={"triviaqa": {"exact_match": True}}).install(monkeypatch)
    models = f"{hf_exports['a']},{hf_exports['b']}"
    bad = eval_config(tasks=["triviaqa"], chat_tasks=[], gate={"rules": {"triviaqa": {"metric": "exact_mtch",
                                                                                        "min": 0.3}}})
    with pytest.raises(ConfigError, match=r"evaluate.gate.rules.triviaqa.metric: 'exact_mtch' is not reported for "
                                          r"triviaqa; it reports \['exact_match/remove_whitespace'\]"):
        stage.run(bad, {"models": models}, str(tmp_path / "bad"))
    assert [name for name, _ in fake.calls] == ["a"]  # b was never scored
    ok = eval_config(tasks=["triviaqa"], chat_tasks=[], gate={"rules": {"triviaqa": {"metric": "exact_match",
                                                                                       "min": 0.3}}})
    m = stage.run(ok, {"models": models}, str(tmp_path / "ok"))
    assert m.metrics["gate_passed"] == 1.0
    [check] = json.loads(Path(m.uri, "results.json").read_text())["gate"]["checks"]
    assert check["metric"] == "exact_match/remove_whitespace" and check["passed"]
