"""The demo world: deterministic, well-formed, and its eval items never leak into training data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.data_prep import demo_world


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return demo_world.generate(tmp_path_factory.mktemp("world"), seed=0, scale=0.2)


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path, world: dict[str, Path]) -> None:
    again = demo_world.generate(tmp_path / "a", seed=0, scale=0.2)
    other = demo_world.generate(tmp_path / "b", seed=1, scale=0.2)
    for path in world.values():
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(world["world"].parent)
            assert (again["world"].parent / rel).read_bytes() == f.read_bytes(), rel
    assert (other["world"].parent / "chat/train.jsonl").read_bytes() != world["chat"].read_bytes()


def test_files_follow_the_contract(world: dict[str, Path]) -> None:
    root = world["world"].parent
    docs = [r for f in sorted((root / "corpus").glob("*.jsonl")) for r in _rows(f)]
    assert len(docs) == round(5600 * 0.2) and all(set(r) == {"text"} and r["text"] for r in docs)
    for r in _rows(world["chat"]):
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        assert all(m["role"] in {"system", "user", "assistant"} and m["content"] for m in r["messages"])
        assert all(m["content"].endswith(m["content"].split("Answer: ")[-1]) for m in r["messages"]
                   if m["role"] == "assistant")
    for path in (world["preferences"], world["eval_preference"]):
        for r in _rows(path):
            assert r["chosen"].startswith("Answer: ") and r["chosen"] != r["rejected"] and r["prompt"]
            assert len(r["chosen"]) < len(r["rejected"]) or r["kind"] == "wrong"
    know = _rows(world["eval_knowledge"])
    assert len(know) == 24 * 4 + 40
    for r in know:
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["answer"] < 4
    for r in _rows(world["eval_format"]):
        assert [m["role"] for m in r["messages"]] == ["user"]
        m = re.search(r["format_regex"], r["answer"])
        assert m and m.group(1) == r["value"]


def test_knowledge_answers_are_the_worlds_facts(world: dict[str, Path]) -> None:
    facts = json.loads(world["world"].read_text())["people"]
    for r in _rows(world["eval_knowledge"]):
        if r["kind"] == "sum":
            nums = [int(x) for x in re.findall(r"\d+", r["question"])]
            assert int(r["choices"][r["answer"]]) == sum(nums)
        else:
            name = next(n for n in facts if re.search(rf"\b{n}\b", r["question"]))
            assert r["choices"][r["answer"]] == facts[name][r["kind"]]


def test_every_fact_is_stated_in_the_corpus(tmp_path: Path) -> None:
    paths = demo_world.generate(tmp_path, seed=3, scale=0.5)
    text = "\n".join(f.read_text() for f in sorted(paths["corpus"].glob("*.jsonl")))
    facts = json.loads(paths["world"].read_text())["people"]
    for name, attrs in facts.items():
        for value in attrs.values():
            assert len(re.findall(rf"{name}\b[^.]*\b{value}\b", text)) >= 5, (name, value)


def test_no_eval_question_or_prompt_appears_in_training_data(world: dict[str, Path]) -> None:
    root = world["world"].parent
    training = "\n".join(
        json.loads(line)["text"] for f in sorted((root / "corpus").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    )
    training += "\n" + "\n".join(m["content"] for r in _rows(world["chat"]) for m in r["messages"])
    training += "\n" + "\n".join(r["prompt"] for r in _rows(world["preferences"]))
    probes = [r["question"] for r in _rows(world["eval_knowledge"])]
    probes += [m["content"] for r in _rows(world["eval_format"]) for m in r["messages"]]
    probes += [r["prompt"] for r in _rows(world["eval_preference"])]
    assert probes
    leaked = [p for p in probes if p in training]
    assert not leaked, leaked[:5]


def test_answer_format_is_taught_only_by_chat_data(world: dict[str, Path]) -> None:
    corpus = "".join(f.read_text() for f in sorted(world["corpus"].glob("*.jsonl")))
    assert "Answer:" not in corpus
    replies = [m["content"] for r in _rows(world["chat"]) for m in r["messages"] if m["role"] == "assistant"]
    concise = sum(r.startswith("Answer: ") for r in replies) / len(replies)
    assert 0.3 < concise < 0.7  # both styles in SFT data: the preference for concise comes from DPO


def test_cli_writes_the_world(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubellm.cli", "demo-world", "--output", str(tmp_path), "--seed", "2",
         "--scale", "0.01"], capture_output=True, text=True, check=True,
    ).stdout
    assert "eval_knowledge" in out and (tmp_path / "eval" / "format.jsonl").is_file()
    assert (tmp_path / "corpus" / "part-00000.jsonl").is_file()
