"""SFT data: assistant-only labels, no cross-conversation leakage in packing, bad records counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kubellm.core.errors import InputDataError
from kubellm.sft.data import (
    IGNORE,
    SkipReport,
    pack_examples,
    read_chat_jsonl,
    read_records,
    render_conversation,
)

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "8"},
]


def test_labels_only_on_assistant_tokens(chat_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    ex = render_conversation(tok, CONV)
    targets = [t for t in ex.labels if t != IGNORE]
    text = tok.decode(targets)
    assert text == "5<|end|>8<|end|>"
    # Changing a user token changes no label (the loss terms are identical).
    other = [dict(m) for m in CONV]
    other[1]["content"] = "What is 9 plus 3?"
    ex2 = render_conversation(tok, other)
    assert [t for t in ex2.labels if t != IGNORE] == targets


def test_packing_keeps_conversations_apart(chat_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    exs = [render_conversation(tok, CONV[:3]), render_conversation(tok, CONV)]
    n0, n1 = len(exs[0].input_ids), len(exs[1].input_ids)
    packs = pack_examples(exs, seq_len=n0 + n1 + 3, pad_id=tok.pad_token_id)
    assert len(packs) == 1
    p = packs[0]
    assert p.doc_ids[:n0] == [0] * n0 and p.doc_ids[n0 : n0 + n1] == [1] * n1
    assert p.position_ids[n0] == 0  # positions restart per conversation
    # The last label of a conversation never points into the next one.
    assert p.labels[n0 - 1] == IGNORE
    assert p.labels[-3:] == [IGNORE] * 3
    with pytest.raises(InputDataError, match="does not fit seq_len"):
        pack_examples(exs, seq_len=n1 - 1, pad_id=0)


def test_bad_records_skipped_and_counted_or_fail(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    f = tmp_path / "chat.jsonl"
    rows = [
        {"messages": CONV},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "ok"}]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    with open(f, "ab") as fh:  # a line that is not UTF-8 is one bad record, not a crash of the stage
        fh.write(b'{"messages": "\xff\xfe"}\n')
    rep = SkipReport()
    got = list(read_chat_jsonl([f], tok, max_len=128, report=rep))
    assert len(got) == 1
    assert rep.counts == {"no_assistant_turn": 1, "unknown_role": 1, "longer_than_the_context": 1,
                          "malformed_record": 2}
    assert any("chat.jsonl:3" in e for e in rep.examples)
    assert any("chat.jsonl:6" in e for e in rep.examples)
    with pytest.raises(InputDataError, match=r"chat.jsonl:2: conversation has no assistant turn"):
        list(read_chat_jsonl([f], tok, max_len=128, report=SkipReport(), on_bad_record="fail"))


USER, ASSISTANT = {"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"}


def test_assistant_before_any_user_turn_is_a_bad_record(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    # the chat template cannot mask a turn with nothing before it: this crashed the whole stage
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [ASSISTANT, USER]}, {"messages": [ASSISTANT]},
            {"messages": [{"role": "system", "content": "Be brief."}, ASSISTANT, USER, ASSISTANT]},
            {"messages": [USER, ASSISTANT]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = SkipReport()
    assert len(list(read_chat_jsonl([f], tok, max_len=128, report=rep))) == 1
    assert rep.counts == {"assistant_before_user": 3}
    with pytest.raises(InputDataError, match=r"chat.jsonl:1: message 0 is an assistant turn before any user turn"):
        list(read_chat_jsonl([f], tok, max_len=128, report=SkipReport(), on_bad_record="fail"))
    with pytest.raises(InputDataError, match="before any user turn"):
        render_conversation(tok, [ASSISTANT])


def test_content_that_is_not_text_has_its_own_reason(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": 5}, ASSISTANT]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, ASSISTANT]},
            {"messages": [{"role": "user", "content": "  "}, ASSISTANT]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = SkipReport()
    assert list(read_chat_jsonl([f], tok, max_len=128, report=rep)) == []
    assert rep.counts == {"content_not_text": 2, "empty_content": 1}
    with pytest.raises(InputDataError, match=r"chat.jsonl:1: message 0 \(user\) content must be text, got int"):
        list(read_chat_jsonl([f], tok, max_len=128, report=SkipReport(), on_bad_record="fail"))


def test_leading_bom_is_ignored(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    f = tmp_path / "chat.jsonl"
    line = json.dumps({"messages": [USER, ASSISTANT]}) + "\n"
    f.write_bytes(b"\xef\xbb\xbf" + (line * 2).encode())
    rep = SkipReport()
    assert len(list(read_chat_jsonl([f], tok, max_len=128, report=rep, on_bad_record="fail"))) == 2
    assert rep.total == 0


def test_unexpected_error_in_one_record_is_that_records(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text('{"n": 1}\n{"n": 2}\n{"n": 3}\n')

    def parse(rec: dict, where: str) -> int:
        if rec["n"] == 2:
            raise RuntimeError("template exploded")
        return int(rec["n"])

    rep = SkipReport()
    assert list(read_records([f], parse, rep)) == [1, 3]
    assert rep.counts == {"record_error": 1}
    assert rep.examples == [f"{f}:2: record_error (RuntimeError: template exploded)"]
    with pytest.raises(InputDataError, match=r"x.jsonl:2: .*RuntimeError: template exploded"):
        list(read_records([f], parse, SkipReport(), "fail"))
