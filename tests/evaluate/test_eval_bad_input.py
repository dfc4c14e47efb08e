"""Bad input to the evaluate stage: each fails with an error naming the thing, and nothing is
published (no eval manifest, pointer untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from evalkit import eval_config, write_jsonl

from kubellm.core.errors import ConfigError, InputDataError
from kubellm.evaluate import stage
from kubellm.evaluate.registry import Promoted, Registry, judge
from kubellm.evaluate.taskdata import read_items


def _published(root: str) -> list[Path]:
    return list(Path(root, "evaluate").rglob("_manifest.json")) if Path(root, "evaluate").exists() else []


def test_dir_that_is_not_an_hf_export(hf_exports, tmp_path: Path) -> None:
    bad = tmp_path / "notmodel"
    bad.mkdir()
    (bad / "notes.txt").write_text("hi")
    with pytest.raises(InputDataError, match=r"notmodel: not a valid HF export: no config.json"):
        stage.run(eval_config(), {"models": f"x:{bad}"}, str(tmp_path / "art"))
    # config.json present but the weights missing
    half = tmp_path / "half"
    shutil.copytree(hf_exports["a"], half)
    (half / "model.safetensors").unlink()
    with pytest.raises(InputDataError, match=r"half: not a valid HF export: no \*\.safetensors weights"):
        stage.run(eval_config(), {"models": str(half)}, str(tmp_path / "art"))
    # weights that are not weights
    broken = tmp_path / "broken"
    shutil.copytree(hf_exports["a"], broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputDataError, match=r"broken: lm-eval could not load it"):
        stage.run(eval_config(tasks=["kubellm_knowledge"]), {"models": str(broken)}, str(tmp_path / "art"))
    assert _published(str(tmp_path / "art")) == []


def test_wrong_artifact_kind(model_artifacts, tmp_path: Path) -> None:
    from kubellm.core.manifest import publish_dir

    d = tmp_path / "d"
    write_jsonl(d / "x.jsonl", [{"text": "a"}])
    ds = publish_dir(d, str(tmp_path / "art" / "data_prep" / "x"), kind="dataset")
    with pytest.raises(InputDataError, match=r"artifact kind is 'dataset', expected 'model'"):
        stage.run(eval_config(), {"models": ds.uri}, str(tmp_path / "art"))


def test_task_that_does_not_exist(hf_exports, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\(s\) \['kubellm_nosuch'\] do not exist"):
        stage.run(eval_config(tasks=["kubellm_knowledge", "kubellm_nosuch"]),
                  {"models": str(hf_exports["a"])}, str(tmp_path / "art"))


def test_an_lm_eval_tag_is_not_a_task() -> None:
    """`kubellm` tags the three bundled tasks: lm-eval ran them all in one call (the format task without its
    chat template) and reported nothing under `kubellm`, failing after all the work."""
    from kubellm.evaluate.harness import task_manager

    with pytest.raises(ConfigError, match=r"evaluate.tasks: \['kubellm'\] is an lm-eval tag, naming several tasks; "
                                          r"list the tasks themselves .* Bundled: kubellm_knowledge"):
        task_manager(["kubellm_knowledge", "kubellm"], None)
    assert task_manager(["kubellm_knowledge"], None) is not None


@pytest.mark.parametrize("row, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 1', "not valid JSON"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "field 'answer' must be an integer index"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "field 'question' must be a non-empty string"),
    ({"question": "q", "choices": "ab", "answer": 0}, "field 'choices' must be a list"),
])
def test_malformed_row_names_file_and_line(hf_exports, tmp_path: Path, row, message) -> None:
    good = {"question": "What is 1 plus 1?", "choices": ["2", "3"], "answer": 0}
    f = write_jsonl(tmp_path / "eval" / "knowledge.jsonl", [good, good, row])
    with pytest.raises(InputDataError, match=rf"{f}:3: {message}"):
        stage.run(eval_config(tasks=["kubellm_knowledge"], eval_dir=str(tmp_path / "eval")),
                  {"models": str(hf_exports["a"])}, str(tmp_path / "art"))
    assert _published(str(tmp_path / "art")) == []


def test_other_schemas(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "preference.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(InputDataError, match=rf"{p}:1: 'chosen' equals 'rejected'"):
        read_items("kubellm_preference", tmp_path)
    f = write_jsonl(tmp_path / "format.jsonl", [{"messages": [{"role": "assistant", "content": "x"}], "answer": "x"}])
    with pytest.raises(InputDataError, match=rf"{f}:1: 'messages' has no non-empty user turn"):
        read_items("kubellm_format", tmp_path)
    user = [{"role": "user", "content": "Colour?"}]
    f = write_jsonl(tmp_path / "format.jsonl", [
        {"messages": user, "answer": "Answer: red", "format_regex": r"Answer:\s*(\w+)"},  # no value: fine
        {"messages": user, "answer": "red", "format_regex": r"Answer:\s*(\w+)"}])
    with pytest.raises(InputDataError, match=rf"{f}:2: no 'value' and 'format_regex' does not match the item's "
                                             r"own 'answer' \('red'\)"):
        read_items("kubellm_format", tmp_path)
    # a value the regex cannot capture from the gold answer: even the gold reply would score correct = 0
    f = write_jsonl(tmp_path / "format.jsonl", [
        {"messages": user, "answer": "Answer: Tarsk City", "value": " Tarsk City ", "format_regex": r"Answer:\s*(.+)"},
        {"messages": user, "answer": "Answer: Tarsk City", "value": "Tarsk City", "format_regex": r"Answer:\s*([A-Za-z]+)"}])
    with pytest.raises(InputDataError, match=rf"{f}:2: 'format_regex' captures 'Tarsk' from the item's own 'answer' "
                                             r"\('Answer: Tarsk City'\), not its 'value' 'Tarsk City'"):
        read_items("kubellm_format", tmp_path)
    with pytest.raises(InputDataError, match=r"knowledge.jsonl: eval data file for task kubellm_knowledge not found"):
        read_items("kubellm_knowledge", tmp_path)
    # the shipped items are valid
    for task in ("kubellm_knowledge", "kubellm_format", "kubellm_preference"):
        assert len(read_items(task)) >= 5


def test_baseline_that_lacks_a_task(tmp_path: Path) -> None:
    base = Promoted(name="kubellm", model_uri="s3://b/m", model_digest="d" * 64, label="old",
                    scores={"kubellm_knowledge": {"acc": 0.5}})
    rules = eval_config(gate={"rules": {"kubellm_preference": {"max_drop": 0.1}}}).gate.rules
    with pytest.raises(InputDataError, match=r"baseline .*promoted.json lacks task kubellm_preference \(it has \['kubellm_knowledge'\]\)"):
        judge({"kubellm_preference": {"acc": 0.7}}, base, rules, {"kubellm_preference": "acc"},
              str(tmp_path / "registry/kubellm/promoted.json"), directions={"kubellm_preference": {"acc": True}})


def test_baseline_pointer_missing_and_bad_rules(hf_exports, tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"no promoted pointer there"):
        stage.run(eval_config(tasks=["kubellm_knowledge"]),
                  {"models": str(hf_exports["a"]), "baseline": str(tmp_path / "reg/kubellm/promoted.json")},
                  str(tmp_path / "art"))
    with pytest.raises(ValueError, match=r"gate.rules names task\(s\) \['arc_easy'\]"):
        eval_config(gate={"rules": {"arc_easy": {"min": 0.3}}})
    with pytest.raises(ValueError, match=r"needs at least one of max_drop, min, max"):
        eval_config(gate={"rules": {"kubellm_knowledge": {}}})
    Path(tmp_path / "reg/kubellm").mkdir(parents=True)
    Path(tmp_path / "reg/kubellm/promoted.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(InputDataError, match=r"promoted.json: not a kubellm promoted-model pointer"):
        Registry(str(tmp_path / "reg"), "kubellm").current()
