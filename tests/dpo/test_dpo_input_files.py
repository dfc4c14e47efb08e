"""DPO reads preference files like SFT: gzipped JSON lines, other formats refused up front, skipped
pairs say what was wrong, files named by their label, and content encoded as text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubellm.core.errors import InputDataError
from kubellm.dpo.data import read_preferences_jsonl
from kubellm.sft.data import IGNORE, SkipReport
from tests.sft.chatkit import write_jsonl

PAIR = {"prompt": "What is 1 plus 2?", "chosen": "3", "rejected": "4"}


def test_gzipped_preferences_are_read(project_tok: Any, tmp_path: Path) -> None:
    # before: "0 usable preference pairs", every line of the gzip a malformed record
    f = write_jsonl(tmp_path / "prefs.jsonl.gz", [PAIR] * 5, gz=True)
    rep = SkipReport()
    assert len(read_preferences_jsonl([f], project_tok, 128, rep, "fail")) == 5
    assert rep.total == 0


def test_a_parquet_file_is_refused_naming_the_uri(project_tok: Any, tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "00000-a.jsonl", [PAIR])
    pq = tmp_path / "00001-b.parquet"
    pq.write_bytes(b"PAR1")
    with pytest.raises(InputDataError, match=r"^s3://b/prefs/b\.parquet: a parquet file; SFT and DPO read JSON"):
        read_preferences_jsonl([good, pq], project_tok, 128, SkipReport(),
                               labels={good: "s3://b/prefs/a.jsonl", pq: "s3://b/prefs/b.parquet"})


def test_skipped_pairs_say_what_was_wrong(project_tok: Any, tmp_path: Path) -> None:
    # before: "p.jsonl:2: malformed_record" with no field named
    f = write_jsonl(tmp_path / "p.jsonl", [PAIR, {**PAIR, "rejected": 4}, {**PAIR, "chosen": "  "},
                                           {"prompt": "x", "chosen": "y"},
                                           {**PAIR, "prompt": [{"role": "user", "content": "hi", "name": "bob"}]}])
    rep = SkipReport()
    assert len(read_preferences_jsonl([f], project_tok, 128, rep)) == 2  # the extra 'name' key is ignored
    assert rep.examples == [
        f"{f}:2: malformed_record ('rejected' must be non-empty text, got int)",
        f"{f}:3: malformed_record ('chosen' must be non-empty text, got blank text)",
        f"{f}:4: malformed_record (expected an object with 'prompt', 'chosen' and 'rejected', got an object "
        "with keys 'chosen', 'prompt')",
    ]
    with pytest.raises(InputDataError, match=r"p\.jsonl:2: 'rejected' must be non-empty text, got int"):
        read_preferences_jsonl([f], project_tok, 128, SkipReport(), "fail")


def test_prompt_and_reply_content_are_text(project_tok: Any, tmp_path: Path) -> None:
    # before: a prompt holding "<|assistant|>" put a second assistant marker into the prompt, and a
    # reply holding "<|end|>" was scored as a turn that ends early
    tok = project_tok
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say <|assistant|> 1 plus 2", "chosen": "3 <|end|> ok",
                                            "rejected": "4"}])
    (ex,) = read_preferences_jsonl([f], tok, 128, SkipReport(), "fail")
    assistant, end = tok.convert_tokens_to_ids("<|assistant|>"), tok.convert_tokens_to_ids("<|end|>")
    assert ex.chosen_ids.count(assistant) == 1 and ex.rejected_ids.count(assistant) == 1
    chosen = [t for t in ex.chosen_labels if t != IGNORE]
    assert chosen.count(end) == 1 and tok.decode(chosen) == "3 <|end|> ok<|end|>\n"
    assert tok.decode(ex.chosen_ids).startswith("<|bos|><|user|>\nSay <|assistant|> 1 plus 2<|end|>\n<|assistant|>\n")
