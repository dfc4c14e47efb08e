"""Preference data for DPO: `{"prompt", "chosen", "rejected"}` records rendered with the chat template.

The prompt is plain text (one user turn) or a `messages` list; chosen/rejected are the assistant's
reply text. Only the reply tokens carry labels, so sequence log-probabilities measure exactly
log π(reply | prompt). A messages prompt starts with system turns or a user turn and ends with a
user (or system) turn, never an assistant one. Bad pairs (identical texts, empty or malformed prompt,
too long) are skipped and counted or fail the stage, per `on_bad_record`. Files and messages are read as
for SFT (`kubellm.sft.data.read_records`, `validate_messages`, `encode_chat`): JSON lines, gzipped or not;
content, replies included, is encoded as text, so a special-token string in it is never a control token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kubellm.core.errors import InputDataError
from kubellm.sft.data import IGNORE, SkipReport, encode_chat, read_records, validate_messages


@dataclasses.dataclass
class PreferenceExample:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def render_reply(tok: Any, prompt: list[dict[str, str]], reply: str, where: str) -> tuple[list[int], list[int]]:
    """The prompt + reply ids, labels on the reply (and the template's end-of-turn) only. As in
    `render_conversation`: where encoding the rendering whole is not prefix-stable (a reply starting
    with whitespace can merge with the template's newline), template text and contents are encoded apart."""
    return render_replies(tok, prompt, [reply], where)[0]


def render_replies(tok: Any, prompt: list[dict[str, str]], replies: list[str],
                   where: str) -> list[tuple[list[int], list[int]]]:
    """`render_reply` for several replies to one prompt, encoded one way for all (whole, or template text
    and contents apart when any reply needs it), so each conditions on the same prompt tokens: chosen and
    rejected differ only in their replies."""
    for apart in (False, True):
        prefix = encode_chat(tok, prompt, add_generation_prompt=True, where=where, apart=apart)
        fulls = [encode_chat(tok, prompt + [{"role": "assistant", "content": r}], where=where, apart=apart)
                 for r in replies]
        if all(full[: len(prefix)] == prefix for full in fulls):
            break
    else:
        raise InputDataError(f"{where}: the chat template is not prefix-stable for the reply, even with template "
                             "text and contents encoded apart")
    return [(full, [full[t + 1] if t + 1 >= len(prefix) else IGNORE for t in range(len(full) - 1)] + [IGNORE])
            for full in fulls]


def parse_record(rec: Any, where: str) -> tuple[list[dict[str, str]], str, str]:
    if not isinstance(rec, dict) or not {"prompt", "chosen", "rejected"} <= set(rec):
        got = (f"an object with keys {', '.join(map(repr, sorted(rec)[:10]))}" if isinstance(rec, dict)
               else type(rec).__name__)
        raise InputDataError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected', got {got}")
    prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputDataError(f"{where}: empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        if not prompt:
            raise InputDataError(f"{where}: empty prompt (an empty messages list)")
        if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            raise InputDataError(f"{where}: prompt ends with an assistant turn; the reply would be a second "
                                 "assistant turn in a row (end the prompt with a user turn)")
        if all(isinstance(m, dict) and m.get("role") == "system" for m in prompt):
            raise InputDataError(f"{where}: prompt has no user turn (only system turns); the reply needs "
                                 "a user turn to answer")
        # the prompt is a conversation up to the reply: checked with a placeholder reply appended
        messages = validate_messages(prompt + [{"role": "assistant", "content": "x"}], where)[:-1]
    else:
        raise InputDataError(f"{where}: 'prompt' must be text or a list of {{role, content}} messages, "
                             f"got {type(prompt).__name__}")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise InputDataError(f"{where}: '{name}' must be non-empty text, got {type(text).__name__}")
        if not text.strip():
            raise InputDataError(f"{where}: '{name}' must be non-empty text, got blank text")
    if chosen.strip() == rejected.strip():
        raise InputDataError(f"{where}: identical pair: chosen equals rejected (no preference to learn)")
    return messages, chosen, rejected


def read_preferences_jsonl(paths: Iterable[Path], tok: Any, max_len: int, report: SkipReport,
                           on_bad_record: str = "skip",
                           labels: Mapping[Path, str] | None = None) -> list[PreferenceExample]:
    """Rendered preference pairs; bad records are skipped and counted or raise (policy). `labels`: the
    names files are given in messages, e.g. the s3:// URI a staged file came from (see `read_records`)."""

    def parse(rec: Any, where: str) -> PreferenceExample:
        messages, chosen, rejected = parse_record(rec, where)
        (c_ids, c_lab), (r_ids, r_lab) = render_replies(tok, messages, [chosen, rejected], where)
        n = max(len(c_ids), len(r_ids))
        if n > max_len:
            raise InputDataError(f"{where}: pair is {n} tokens, longer than the context ({max_len}); "
                                 "it is not truncated")
        return PreferenceExample(c_ids, c_lab, r_ids, r_lab)

    return list(read_records(paths, parse, report, on_bad_record, labels))


def to_arrays(examples: Iterable[PreferenceExample], seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Fixed-shape arrays: input_ids/labels of shape (2, seq_len) — row 0 chosen, row 1 rejected."""
    def pad(x: list[int], v: int) -> list[int]:
        return x + [v] * (seq_len - len(x))

    return [{"input_ids": np.asarray([pad(e.chosen_ids, pad_id), pad(e.rejected_ids, pad_id)], dtype=np.int64),
             "labels": np.asarray([pad(e.chosen_labels, IGNORE), pad(e.rejected_labels, IGNORE)], dtype=np.int64)}
            for e in examples]
