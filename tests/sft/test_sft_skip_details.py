"""A skipped record keeps its reason category and says what was wrong (field, expected, got), in the
report, the log and the stage's "0 usable" error; benign extra message keys are ignored."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from kubellm.core.errors import InputDataError
from kubellm.sft.data import SkipReport, read_chat_jsonl, render_conversation
from kubellm.sft.stage import no_usable_records
from tests.sft.chatkit import ASSISTANT, CONV, USER, write_jsonl


def test_skipped_records_say_what_was_wrong(project_tok: Any, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    # before: every one of these was "<file>:<line>: malformed_record" with nothing more
    f = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": {"role": "user", "content": "hi"}},
        {"conversations": []},
        [CONV],
        {"messages": [USER, "hello"]},
        {"messages": [{"role": "user"}, ASSISTANT]},
        "{not json",
    ])
    with open(f, "ab") as fh:
        fh.write(b'{"messages": "\xff"}\n')
    rep = SkipReport()
    with caplog.at_level(logging.WARNING, logger="kubellm.sft.data"):
        assert list(read_chat_jsonl([f], project_tok, 128, rep)) == []
    assert rep.counts == {"malformed_record": 7}
    assert rep.examples == [
        f"{f}:1: malformed_record ('messages' must be a non-empty list of {{role, content}} objects, got dict)",
        f"{f}:2: malformed_record (expected an object with a 'messages' list, got an object with keys "
        "'conversations')",
        f"{f}:3: malformed_record (expected an object with a 'messages' list, got list)",
        f"{f}:4: malformed_record (message 1 must be an object with 'role' and 'content', got str)",
        f"{f}:5: malformed_record (message 0 has no 'content' (its keys: 'role'))",
        f"{f}:6: malformed_record (not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        f"{f}:7: malformed_record (not UTF-8: byte 14 of the line (invalid start byte))",
    ]
    assert f"{f}:1: record skipped: malformed_record ('messages' must be" in caplog.text
    err = no_usable_records("conversations", str(f), rep)
    assert "got dict" in str(err) and "message 1 must be an object with 'role' and 'content', got str" in str(err)


def test_benign_extra_message_keys_are_ignored(project_tok: Any, tmp_path: Path) -> None:
    # before: {"role", "content", "name"} was refused as "must be an object with 'role' and 'content'"
    named = [{**USER, "name": "bob", "tool_calls": None}, {**ASSISTANT, "name": "helper", "weight": 1}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": named}])
    got = list(read_chat_jsonl([f], project_tok, 128, SkipReport(), "fail"))
    assert len(got) == 1
    plain = render_conversation(project_tok, [USER, ASSISTANT])
    assert (got[0].input_ids, got[0].labels) == (plain.input_ids, plain.labels)  # the names are not rendered


@pytest.mark.parametrize(("extra", "key"), [
    ({"tool_calls": [{"id": "1", "type": "function"}]}, "'tool_calls'"),
    ({"weight": 0}, "'weight'"),
    ({"reasoning_content": "Let me think."}, "'reasoning_content'"),
])
def test_keys_that_change_the_conversation_are_refused_by_name(project_tok: Any, tmp_path: Path,
                                                               extra: dict[str, Any], key: str) -> None:
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, {**ASSISTANT, **extra}]}])
    rep = SkipReport()
    assert list(read_chat_jsonl([f], project_tok, 128, rep)) == []
    assert rep.counts == {"unsupported_message_key": 1}
    with pytest.raises(InputDataError, match=rf"chat\.jsonl:1: message 1 sets {key}, which is not supported here"):
        list(read_chat_jsonl([f], project_tok, 128, SkipReport(), "fail"))
