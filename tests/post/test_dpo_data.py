"""DPO preference records: a prompt that is not text or a well-formed messages list is one bad record
(skipped and counted, or the failure naming file:line), never a crash of the stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from kubellm.core.errors import InputDataError
from kubellm.dpo.data import read_preferences_jsonl
from kubellm.sft.data import SkipReport

USER = {"role": "user", "content": "What is 1 plus 2?"}
ASSISTANT = {"role": "assistant", "content": "3"}
SYSTEM = {"role": "system", "content": "Be brief."}


def _pair(prompt: Any) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": "3", "rejected": "4"}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_of_the_wrong_type_is_a_bad_record(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    f = _write(tmp_path / "p.jsonl", [_pair(5), _pair(None), _pair(USER), _pair([]), _pair("What is 1 plus 2?")])
    rep = SkipReport()
    assert len(read_preferences_jsonl([f], tok, 128, rep)) == 1
    assert rep.counts == {"prompt_not_text_or_messages": 3, "empty_prompt": 1}
    with pytest.raises(InputDataError, match=r"p.jsonl:1: 'prompt' must be text or a list .* got int"):
        read_preferences_jsonl([f], tok, 128, SkipReport(), "fail")


@pytest.mark.parametrize(("prompt", "reason", "message"), [
    ([USER, ASSISTANT], "prompt_ends_with_assistant", "prompt ends with an assistant turn"),
    ([ASSISTANT], "prompt_ends_with_assistant", "prompt ends with an assistant turn"),
    ([ASSISTANT, USER], "assistant_before_user", "message 0 is an assistant turn before any user turn"),
    ([SYSTEM, ASSISTANT, USER], "assistant_before_user", "message 1 is an assistant turn before any user turn"),
    ([SYSTEM], "prompt_without_user_turn", "prompt has no user turn"),
])
def test_prompt_messages_must_lead_to_one_reply(chat_tokenizer_dir: Path, tmp_path: Path, prompt: list[Any],
                                                reason: str, message: str) -> None:
    # before: these were accepted and rendered two assistant turns in a row (or a reply to nothing)
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    f = _write(tmp_path / "p.jsonl", [_pair([SYSTEM, USER]), _pair(prompt)])
    rep = SkipReport()
    assert len(read_preferences_jsonl([f], tok, 128, rep)) == 1
    assert rep.counts == {reason: 1}
    with pytest.raises(InputDataError, match=rf"p.jsonl:2: {message}"):
        read_preferences_jsonl([f], tok, 128, SkipReport(), "fail")


def test_leading_bom_is_ignored(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_pair("What is 1 plus 2?")) + "\n").encode())
    rep = SkipReport()
    assert len(read_preferences_jsonl([f], tok, 128, rep, "fail")) == 1
    assert rep.total == 0
