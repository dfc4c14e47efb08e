"""Chat data for SFT: render with the tokenizer's chat template, mask to assistant tokens, pack.

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ex = render_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    packs = pack_examples([ex, ...], seq_len=128, pad_id=tok.pad_token_id)

Masking works for any chat template: the assistant tokens of turn i are the tokens between the
rendering of messages[:i] with `add_generation_prompt=True` and the rendering of messages[:i+1].
Packing puts several conversations into one sequence; `doc_ids` keeps attention inside each
conversation (the model's block-diagonal mask) and positions restart per conversation, so neither
attention nor loss crosses between them.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kubellm.core.errors import InputDataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE = -100
T = TypeVar("T")
_BOM = codecs.BOM_UTF8  # a UTF-8 byte-order mark, ignored at the start of a file


@dataclasses.dataclass
class ChatExample:
    """One rendered conversation. labels[t] is the target of position t (already shifted)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclasses.dataclass
class SkipReport:
    """Records that were skipped, by reason, with file and line of the first few."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def summary(self) -> str:
        """`reason: n, ...` sorted by reason, or `none`."""
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "none"

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _ids(out: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """The messages list of one conversation, checked: each message is `{role, content}` with a known
    role and non-empty text, a user turn comes before the first assistant turn (the chat template
    masks an assistant turn by what precedes it), and there is an assistant turn to learn from."""
    if not isinstance(messages, list) or not messages:
        raise InputDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise InputDataError(f"{where}: message {j} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputDataError(f"{where}: message {j} has unknown role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputDataError(f"{where}: message {j} ({m['role']}) content must be text, "
                                 f"got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise InputDataError(f"{where}: message {j} ({m['role']}) has empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputDataError(f"{where}: conversation has no assistant turn (nothing to learn from)")
    first = next(j for j, m in enumerate(messages) if m["role"] != "system")
    if messages[first]["role"] == "assistant":
        raise InputDataError(f"{where}: message {first} is an assistant turn before any user turn "
                             "(nothing for it to reply to)")
    return messages


def render_conversation(tok: Any, messages: list[dict[str, str]], where: str = "<conversation>") -> ChatExample:
    """Token ids of the whole conversation and labels that are set only on assistant tokens."""
    full = _ids(tok.apply_chat_template(messages, tokenize=True))
    trainable = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InputDataError(f"{where}: message 0 is an assistant turn before any user turn "
                                 "(nothing for it to reply to)")
        prefix = _ids(tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True))
        upto = _ids(tok.apply_chat_template(messages[: i + 1], tokenize=True))
        if upto[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise InputDataError(
                f"{where}: the chat template does not render turn {i} as a prefix of the conversation; "
                "assistant-only masking needs a prefix-stable template"
            )
        for t in range(len(prefix), len(upto)):
            trainable[t] = True
    # Shift: position t predicts token t+1; the label is kept only when that token is the assistant's.
    labels = [full[t + 1] if trainable[t + 1] else IGNORE for t in range(len(full) - 1)] + [IGNORE]
    return ChatExample(full, labels)


def read_records(paths: Iterable[Path], parse: Callable[[Any, str], T], report: SkipReport,
                 on_bad_record: str = "skip") -> Iterator[T]:
    """Stream `parse(record, "file:line")` over JSON-lines files with one bad-record policy: a line
    that is not UTF-8 or JSON, or that `parse` rejects, is skipped and counted in `report` ("skip")
    or stops the stage naming the file and line ("fail"). A UTF-8 byte-order mark at the start of a
    file is ignored. Any other error while one record is parsed or rendered (e.g. from the chat
    template) is that record's: skipped as `record_error` with the exception's text, or the failure."""
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if lineno == 1:
                    raw = raw.removeprefix(_BOM)
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    value = parse(json.loads(line), where)
                except (InputDataError, json.JSONDecodeError, UnicodeDecodeError) as e:
                    if on_bad_record == "fail":
                        raise InputDataError(str(e) if isinstance(e, InputDataError) else f"{where}: {e}") from None
                    report.add(_reason(e), where)
                    continue
                except MemoryError:
                    raise
                except Exception as e:  # any other per-record failure names its record
                    detail = f"{type(e).__name__}: {str(e)[:200]}"
                    if on_bad_record == "fail":
                        raise InputDataError(f"{where}: this record could not be processed ({detail})") from e
                    log.warning("%s: record skipped (%s)", where, detail)
                    report.add("record_error", where, detail)
                    continue
                yield value


def read_chat_jsonl(paths: Iterable[Path], tok: Any, max_len: int, report: SkipReport,
                    on_bad_record: str = "skip") -> Iterator[ChatExample]:
    """Stream rendered conversations; bad records are skipped and counted or raise (policy)."""

    def parse(rec: Any, where: str) -> ChatExample:
        if not isinstance(rec, dict) or "messages" not in rec:
            raise InputDataError(f"{where}: expected an object with a 'messages' list")
        ex = render_conversation(tok, validate_messages(rec["messages"], where), where)
        if len(ex.input_ids) > max_len:
            raise InputDataError(f"{where}: conversation is {len(ex.input_ids)} tokens, longer than the "
                                 f"context ({max_len}); it is not truncated")
        return ex

    return read_records(paths, parse, report, on_bad_record)


# substring of an InputDataError's text -> the reason it is counted under in a SkipReport
_REASONS = (
    ("unknown role", "unknown_role"), ("no assistant turn", "no_assistant_turn"),
    ("longer than the context", "longer_than_the_context"), ("empty content", "empty_content"),
    ("content must be text", "content_not_text"), ("before any user turn", "assistant_before_user"),
    ("identical pair", "identical_pair"), ("empty prompt", "empty_prompt"),
    ("'prompt' must be text", "prompt_not_text_or_messages"),
    ("prompt ends with an assistant turn", "prompt_ends_with_assistant"),
    ("prompt has no user turn", "prompt_without_user_turn"),
)


def _reason(e: Exception) -> str:
    text = str(e)
    for key, reason in _REASONS:
        if key in text:
            return reason
    return "malformed_record"


@dataclasses.dataclass
class PackedSequence:
    input_ids: list[int]
    labels: list[int]
    doc_ids: list[int]
    position_ids: list[int]


def pack_examples(examples: Iterable[ChatExample], seq_len: int, pad_id: int) -> list[PackedSequence]:
    """Greedy first-fit-in-order packing; padding has label IGNORE and its own doc id."""
    packs: list[PackedSequence] = []
    cur = PackedSequence([], [], [], [])
    doc = 0

    def flush() -> None:
        nonlocal cur, doc
        if not cur.input_ids:
            return
        pad = seq_len - len(cur.input_ids)
        cur.input_ids += [pad_id] * pad
        cur.labels += [IGNORE] * pad
        cur.doc_ids += [doc] * pad
        cur.position_ids += list(range(pad))
        packs.append(cur)
        cur, doc = PackedSequence([], [], [], []), 0

    for ex in examples:
        n = len(ex.input_ids)
        if n > seq_len:
            raise InputDataError(f"a conversation of {n} tokens does not fit seq_len {seq_len}")
        if len(cur.input_ids) + n > seq_len:
            flush()
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.doc_ids += [doc] * n
        cur.position_ids += list(range(n))
        doc += 1
    flush()
    return packs
