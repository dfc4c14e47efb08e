"""The bundled tasks: shipped items come from the demo world; format scoring; task YAML loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kubellm.evaluate.taskdata import DEFAULT_DATA_DIR, TASK_FILES, TASKS_DIR


def _utils():
    spec = importlib.util.spec_from_file_location("kubellm_eval_task_utils", TASKS_DIR / "utils.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_items_are_the_demo_worlds_held_out_items(tmp_path: Path) -> None:
    demo = pytest.importorskip("kubellm.data_prep.demo_world")
    paths = demo.generate(tmp_path, seed=0, scale=0.01)
    for name in TASK_FILES.values():
        shipped = (DEFAULT_DATA_DIR / name).read_text()
        assert shipped == Path(paths[f"eval_{name.split('.')[0]}"]).read_text(), (
            f"{name} drifted from the demo world: regenerate with "
            "generate(dir, seed=0) and copy dir/eval/*.jsonl to kubellm/evaluate/tasks/data/")


def test_format_scoring() -> None:
    score = _utils().format_results
    doc = {"answer": "Answer: red", "value": "red", "format_regex": r"Answer:\s*([A-Za-z0-9]+)"}
    assert score(doc, [" Answer: red"]) == {"exact_match": 1.0, "format_ok": 1.0, "correct": 1.0}
    assert score(doc, ["Sure! Answer: blue"]) == {"exact_match": 0.0, "format_ok": 1.0, "correct": 0.0}
    assert score(doc, ["red"]) == {"exact_match": 0.0, "format_ok": 0.0, "correct": 0.0}
    # no value: the regex's capture from the item's own answer is the expected value
    no_value = {**doc, "value": ""}
    assert score(no_value, ["Answer: red"]) == {"exact_match": 1.0, "format_ok": 1.0, "correct": 1.0}
    assert score(no_value, ["Answer: blue"])["correct"] == 0.0
    # a value with spaces around it is compared stripped; an optional group that took no part is ""
    spaced = {**doc, "value": " red "}
    assert score(spaced, ["Answer: red"])["correct"] == 1.0
    optional = {"answer": "Answer: red", "value": "red", "format_regex": r"Answer:\s*(\w+)?"}
    assert score(optional, ["Answer:"]) == {"exact_match": 0.0, "format_ok": 1.0, "correct": 0.0}
    plain = {"answer": "7", "value": "", "format_regex": ""}
    assert score(plain, ["7 is it"]) == {"exact_match": 0.0, "format_ok": 1.0, "correct": 1.0}


def test_tasks_load_offline_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    loaded = tm.load(["kubellm_knowledge", "kubellm_format", "kubellm_preference"])["tasks"]
    know = loaded["kubellm_knowledge"]
    doc = know.test_docs()[0]
    assert know.doc_to_text(doc) == doc["question"] and know.doc_to_target(doc) == doc["answer"]
    pref = loaded["kubellm_preference"]
    pdoc = pref.test_docs()[0]
    assert pref.doc_to_choice(pdoc) == [pdoc["chosen"], pdoc["rejected"]] and pref.doc_to_target(pdoc) == 0
    assert len(loaded["kubellm_format"].test_docs()) == sum(1 for _ in open(DEFAULT_DATA_DIR / "format.jsonl"))


def test_preference_scoring() -> None:
    score = _utils().preference_results
    doc = {"chosen": "Answer: red", "rejected": "Let me think about it for a while. Answer: red"}
    # chosen: -6 nats over 11 bytes; rejected: -20 nats over 46 bytes (more likely per byte)
    out = score(doc, [(-6.0, False), (-20.0, False)])
    assert out == {"acc": 1.0, "acc_norm": 0.0, "margin": 14.0}
