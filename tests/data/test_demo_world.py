"""The demo world: deterministic, well-formed, and its eval items never leak into training data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.core.errors import ConfigError
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


def _corpus_docs(root: Path) -> int:
    return sum(len(_rows(f)) for f in (root / "corpus").glob("*.jsonl"))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_regenerating_replaces_the_previous_world(tmp_path: Path) -> None:
    out = tmp_path / "world"
    demo_world.generate(out, seed=0, scale=0.1)  # 560 documents in 4 shards
    demo_world.generate(out, seed=0, scale=0.01)  # 56 documents in 1 shard: the old shards must go
    assert _corpus_docs(out) == 56 and sorted(p.name for p in (out / "corpus").iterdir()) == ["part-00000.jsonl"]
    assert _tree(out) == _tree(Path(demo_world.generate(tmp_path / "fresh", seed=0, scale=0.01)["world"]).parent)
    assert sorted(p.name for p in out.iterdir()) == ["chat", "corpus", "eval", "preferences", "world.json"]


def test_files_the_world_does_not_own_are_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "world"
    demo_world.generate(out, seed=0, scale=0.01)
    (out / "notes.txt").write_text("mine")
    (out / "corpus" / "extra.jsonl").write_text('{"text": "mine"}\n')
    before = _tree(out)
    with pytest.raises(ConfigError, match=r"corpus/extra.jsonl, notes.txt") as err:
        demo_world.generate(out, seed=0, scale=0.1)
    assert str(out) in str(err.value)
    assert _tree(out) == before and not list(out.glob(".demo-world-tmp-*"))  # nothing replaced or written
    user_dir = tmp_path / "project"
    (user_dir / "src").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"\(src\)"):
        demo_world.generate(user_dir, seed=0, scale=0.01)
    assert [p.name for p in user_dir.iterdir()] == ["src"]


def test_a_failed_regeneration_keeps_the_previous_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "world"
    demo_world.generate(out, seed=0, scale=0.01)
    (out / ".demo-world-tmp-0123456789ab").mkdir()  # an interrupted earlier run's scratch: ours
    before = _tree(out)

    def broken(*_: object) -> list[dict[str, str]]:
        raise OSError("disk full")

    monkeypatch.setattr(demo_world, "_conversation", broken)
    with pytest.raises(OSError, match="disk full"):
        demo_world.generate(out, seed=0, scale=0.1)
    assert _tree(out) == before
    monkeypatch.undo()
    demo_world.generate(out, seed=0, scale=0.01)
    assert not list(out.glob(".demo-world-tmp-*"))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e9, 1000.5])
def test_scale_must_be_finite_and_bounded(tmp_path: Path, scale: float) -> None:
    with pytest.raises(ConfigError, match=r"scale must be a finite number in \(0, 1000\]"):
        demo_world.generate(tmp_path / "w", seed=0, scale=scale)
    assert not (tmp_path / "w").exists()


def test_cli_refuses_a_bad_scale_on_stderr(tmp_path: Path) -> None:
    for scale in ("nan", "1e9", "0"):
        res = subprocess.run([sys.executable, "-m", "kubellm.cli", "demo-world", "--output", str(tmp_path / "w"),
                              "--scale", scale], capture_output=True, text=True)
        assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
        assert "argument --scale: must be a finite number in (0, 1000]" in res.stderr and repr(scale) in res.stderr
    assert not (tmp_path / "w").exists()
    helptext = subprocess.run([sys.executable, "-m", "kubellm.cli", "demo-world", "--help"],
                              capture_output=True, text=True, check=True).stdout
    assert "(0, 1000]" in " ".join(helptext.split())


def test_corpus_documents_are_streamed_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = 0
    documents, write_jsonl = demo_world._documents, demo_world._write_jsonl
    made_at_open: dict[str, int] = {}

    def counting(world: dict, n_docs: int):  # noqa: ANN202
        nonlocal made
        for doc in documents(world, n_docs):
            made += 1
            yield doc

    def recording(path: Path, rows):  # noqa: ANN001, ANN202
        made_at_open[path.name] = made
        return write_jsonl(path, rows)

    monkeypatch.setattr(demo_world, "_documents", counting)
    monkeypatch.setattr(demo_world, "_write_jsonl", recording)
    demo_world.generate(tmp_path, seed=0, scale=0.1)  # 560 documents, 140 per shard
    assert [made_at_open[f"part-{i:05d}.jsonl"] for i in range(4)] == [0, 140, 280, 420]
