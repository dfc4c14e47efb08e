"""Model labels and the gate candidate: every model keeps its own label, and a bad candidate name
is refused before any model is evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalkit import eval_config

from kubellm.core.errors import ConfigError
from kubellm.core.storage import storage_for
from kubellm.evaluate import harness, stage


def _no_eval(*a, **k):  # noqa: ANN002, ANN003
    raise AssertionError("a model was loaded before the bad config was refused")


def test_explicit_duplicate_labels_are_refused(hf_exports, tmp_path: Path) -> None:
    a, b = hf_exports["a"], hf_exports["b"]
    with pytest.raises(ConfigError, match=r"label\(s\) \['x'\] given to more than one model"):
        stage.run(eval_config(), {"models": f"x:{a},x:{b}"}, str(tmp_path / "art"))
    assert not (tmp_path / "art" / "evaluate").exists()


@pytest.mark.parametrize("name", ["run,1", "a,b,c", "run, 1", "a,,b"])
def test_a_model_path_with_a_comma_is_named(hf_exports, tmp_path: Path, name: str) -> None:
    """Commas separate the models of the input: a path holding one is refused by its whole name, not
    reported as a missing `/…/run` artifact."""
    model = tmp_path / name
    model.symlink_to(hf_exports["a"], target_is_directory=True)
    with pytest.raises(ConfigError, match=rf"'{model}' contains a comma, which separates models"):
        stage.run(eval_config(), {"models": f"base:{model},sft:{hf_exports['b']}"}, str(tmp_path / "art"))
    assert not (tmp_path / "art" / "evaluate").exists()


def test_default_labels_never_collide_with_another_model(hf_exports, tmp_path: Path) -> None:
    # two exports whose default label (the dir name) is "a", plus one explicitly labelled "a-2":
    # the old suffixing gave ['a-2', 'a-2', ...] and dropped a model from the parents
    a, b = hf_exports["a"], hf_exports["b"]
    other = tmp_path / "other" / "a"
    other.parent.mkdir()
    other.symlink_to(b, target_is_directory=True)
    m = stage.run(eval_config(tasks=["kubellm_knowledge"], limit=1),
                  {"models": f"{a},a-2:{b},{other}"}, str(tmp_path / "art"))
    results = json.loads(storage_for(m.uri).read_bytes(m.file_uri("results.json")))
    labels = [x["label"] for x in results["models"]]
    assert labels == ["a", "a-2", "a-3"]
    assert set(m.parents) == {"model:a", "model:a-2", "model:a-3"}


def test_unknown_gate_candidate_is_refused_before_evaluating(hf_exports, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "load_model", _no_eval)
    with pytest.raises(ConfigError, match=r"evaluate.gate.candidate: 'nope' is not one of the models \['a', 'b'\]"):
        stage.run(eval_config(gate={"candidate": "nope"}),
                  {"models": f"{hf_exports['a']},{hf_exports['b']}"}, str(tmp_path / "art"))


def test_task_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tasks lists \['kubellm_knowledge'\] more than once"):
        eval_config(tasks=["kubellm_knowledge", "kubellm_format", "kubellm_knowledge"])


def test_perplexity_rule_without_tokens_is_refused_before_evaluating(hf_exports, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "load_model", _no_eval)
    cfg = eval_config(gate={"rules": {"perplexity": {"max": 100}}})
    with pytest.raises(ConfigError, match=r"perplexity rule but no tokens input was given"):
        stage.run(cfg, {"models": str(hf_exports["a"])}, str(tmp_path / "art"))
    # with the gate off the rule is not applied, so nothing is refused for it
    assert not eval_config(gate={"enabled": False, "rules": {"perplexity": {"max": 100}}}).gate.enabled


def test_zero_stderr_is_shown() -> None:
    from kubellm.evaluate.report import table_rows

    results = {"columns": [["t", "acc"]], "baseline": None,
               "models": [{"label": "m", "scores": {"t": {"acc": 1.0, "acc_stderr": 0.0}}}]}
    assert table_rows(results)[1] == [["m", "1.0000 ± 0.000"]]


def test_rule_or_headline_on_a_metric_a_bundled_task_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"gate.rules.kubellm_knowledge.metric: kubellm_knowledge reports no metric "
                                         r"'f1'; it reports \['acc', 'acc_norm'\]"):
        eval_config(gate={"rules": {"kubellm_knowledge": {"metric": "f1", "min": 0.5}}})
    with pytest.raises(ValueError, match=r"headline.perplexity: perplexity reports no metric 'ppl'"):
        eval_config(headline={"perplexity": "ppl"})
    eval_config(tasks=["kubellm_format", "arc_easy"], headline={"arc_easy": "acc_norm"},
                gate={"rules": {"kubellm_format": {"metric": "correct", "min": 0.1}}})
    with pytest.raises(ValueError, match=r"headline names task\(s\) \['kubellm_knowlege'\] that are not evaluated"):
        eval_config(headline={"kubellm_knowlege": "acc_norm"})
    # a preset's headline for a bundled task the run leaves out is dropped, not an error
    assert eval_config(tasks=["kubellm_knowledge"], headline={"kubellm_preference": "margin"}).headline == {}


def test_a_headline_lm_eval_does_not_report_is_refused_not_replaced() -> None:
    """A standard task's metrics are known only from its results: a typo is refused naming what it
    reports; a bare metric lm-eval reports under one filter is that one; under two, ambiguous."""
    cfg = eval_config(tasks=["gsm8k", "hellaswag"], chat_tasks=[],
                      headline={"gsm8k": "exact_match", "hellaswag": "acc_nrom"})
    one = {"exact_match/strict-match": 0.1, "exact_match_stderr/strict-match": 0.01}
    assert stage.headline_metric(cfg, "gsm8k", one) == "exact_match/strict-match"
    with pytest.raises(ConfigError, match=r"evaluate.headline.gsm8k: 'exact_match' is ambiguous for gsm8k; it "
                                          r"reports \['exact_match/flexible-extract', 'exact_match/strict-match'\]"):
        stage.headline_metric(cfg, "gsm8k", {**one, "exact_match/flexible-extract": 0.2})
    with pytest.raises(ConfigError, match=r"evaluate.headline.hellaswag: 'acc_nrom' is not reported for hellaswag; "
                                          r"it reports \['acc', 'acc_norm'\]"):
        stage.headline_metric(cfg, "hellaswag", {"acc": 0.3, "acc_norm": 0.35, "acc_stderr": 0.01})
    # no headline set: the first of acc_norm, acc, exact_match, f1 the task reports
    assert stage.headline_metric(eval_config(tasks=["hellaswag"], chat_tasks=[]), "hellaswag",
                                 {"acc": 0.3, "acc_norm": 0.35}) == "acc_norm"


def test_bundled_metrics_match_the_task_yamls() -> None:
    import yaml

    from kubellm.evaluate.config import BUNDLED_METRICS
    from kubellm.evaluate.taskdata import TASKS_DIR

    for task, metrics in BUNDLED_METRICS.items():
        if task != "perplexity":
            spec = yaml.safe_load((TASKS_DIR / f"{task}.yaml").read_text().replace("!function", ""))
            assert tuple(m["metric"] for m in spec["metric_list"]) == metrics
