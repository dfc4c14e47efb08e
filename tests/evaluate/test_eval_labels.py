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
