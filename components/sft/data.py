"""Chat data for SFT: render with the tokenizer's chat template, mask to assistant tokens, pack.

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ex = render_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    packs = pack_examples([ex, ...], seq_len=128, pad_id=tok.pad_token_id)

Masking works for any prefix-stable chat template: the assistant tokens of turn i are the tokens
between the rendering of messages[:i] with `add_generation_prompt=True` and the rendering of
messages[:i+1]. Where the tokens of the whole rendering are not prefix-stable although its text is (a
reply starting with whitespace that BPE merges with the template's newline), template text and
contents are encoded apart (`render_conversation`).
Packing puts several conversations into one sequence; `doc_ids` keeps attention inside each
conversation (the model's block-diagonal mask) and positions restart per conversation, so neither
attention nor loss crosses between them.

Message content is text, never markup: a special-token string inside it (`<|assistant|>`, `<|end|>`,
`<|eos|>`) is encoded as ordinary text, so data cannot inject role markers or end a turn early; only
the template's own markers are control tokens (`encode_chat`).

Input files are JSON lines (`.jsonl`, `.ndjson`, or `.json` holding JSON lines), gzipped or not; any
other format a source can name (a JSON array, parquet, text, a `hf:` hub dataset) is refused, naming
the file, before any record is read.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kubellm.core.errors import InputDataError
from kubellm.data_prep.records import READ_ERRORS, is_json_array, open_binary, unreadable
from kubellm.data_prep.sources import HUB_SCHEME, format_of

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
    """Records that were skipped, by reason, with file, line and what was wrong for the first few."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 20:
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
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


# Keys of a message that carry conversation content or training control. Any other extra key (`name`,
# `id`, metadata) is ignored: only role and content are rendered. These would be silently lost, so a
# message that sets one is refused by name (unset: absent, null or empty; `weight` 1 is the default).
UNSUPPORTED_KEYS = ("tool_calls", "function_call", "tool_call_id", "reasoning_content", "weight")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """The messages list of one conversation, checked and reduced to `{role, content}`: each message has
    a known role and non-empty text, a user turn comes before the first assistant turn (the chat
    template masks an assistant turn by what precedes it), and there is an assistant turn to learn from.
    Other keys of a message (OpenAI-style `name`, ids, metadata) are ignored, since only role and content
    are rendered, except UNSUPPORTED_KEYS (tool calls, reasoning, per-turn weights), which are refused
    naming the key."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise InputDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, "
                             f"got {got}")
    out: list[dict[str, str]] = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputDataError(f"{where}: message {j} must be an object with 'role' and 'content', "
                                 f"got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise InputDataError(f"{where}: message {j} has no {' and no '.join(map(repr, missing))} "
                                 f"(its keys: {', '.join(map(repr, sorted(m)[:10]))})")
        unsupported = [k for k in UNSUPPORTED_KEYS
                       if m.get(k) not in (None, [], {}, "") and not (k == "weight" and m[k] == 1)]
        if unsupported:
            raise InputDataError(f"{where}: message {j} sets {', '.join(map(repr, unsupported))}, which is not "
                                 "supported here: only 'role' and 'content' are rendered, so training would "
                                 "see a different conversation (other extra keys such as 'name' are ignored)")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise InputDataError(f"{where}: message {j} has unknown role {_short(role)}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputDataError(f"{where}: message {j} ({role}) content must be text, "
                                 f"got {type(content).__name__}")
        if not content.strip():
            raise InputDataError(f"{where}: message {j} ({role}) has empty content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise InputDataError(f"{where}: conversation has no assistant turn (nothing to learn from)")
    first = next(j for j, m in enumerate(out) if m["role"] != "system")
    if out[first]["role"] == "assistant":
        raise InputDataError(f"{where}: message {first} is an assistant turn before any user turn "
                             "(nothing for it to reply to)")
    return out


def _special_strings(tok: Any) -> list[str]:
    """The text of every special token `tok` reads as a control token."""
    found = set(getattr(tok, "all_special_tokens", None) or ())
    added = getattr(tok, "added_tokens_decoder", None) or {}
    found.update(t.content for t in added.values() if getattr(t, "special", False))
    return sorted(t for t in found if t)


def encode_chat(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                where: str = "<conversation>", apart: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, with each message's content
    encoded as ordinary text: a special-token string in it (`<|assistant|>`, `<|end|>`) becomes ordinary
    tokens, never the control id, while the template's own markers stay control tokens. A conversation
    without such a string is exactly `apply_chat_template(messages, tokenize=True)`, unless `apart`:
    then template text and contents are always encoded apart, so no token spans a boundary between
    them (what keeps a reply that starts with whitespace prefix-stable: see `render_conversation`)."""
    specials = _special_strings(tok)
    found = sorted({s for m in messages for s in specials if s in m["content"]})
    if not found and not apart:
        return _ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))
    # Render once with a unique placeholder per content: what is not a placeholder is the template's own
    # text (markers read as control tokens); each content is encoded with special tokens split as text.
    key = uuid.uuid4().hex
    marks = [f"kubellm{key}m{j}e" for j in range(len(messages))]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    masked = tok.apply_chat_template([{"role": m["role"], "content": k} for m, k in zip(messages, marks, strict=True)],
                                     tokenize=False, add_generation_prompt=add_generation_prompt)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m, k in zip(messages, marks, strict=True):
        at = masked.find(k, pos)
        if at < 0 or masked.count(k) != 1:
            break
        pieces += [(masked[pos:at], False), (m["content"], True)]
        pos = at + len(k)
    else:
        pieces.append((masked[pos:], False))
        if "".join(p for p, _ in pieces) == text:
            ids: list[int] = []
            for piece, is_content in pieces:
                if piece:
                    ids += tok(piece, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]
            return ids
    why = (f"the content contains special-token text ({', '.join(found)})" if found else
           "a turn's tokens merge with the template text around it (e.g. a reply that starts with whitespace)")
    raise InputDataError(f"{where}: {why} and the chat template does not render each message's content once, in "
                         "order and unchanged, so it cannot be encoded apart from the template's own markers")


def render_conversation(tok: Any, messages: list[dict[str, str]], where: str = "<conversation>",
                        apart: bool = False) -> ChatExample:
    """Token ids of the whole conversation and labels that are set only on assistant tokens.

    When encoding the rendering whole is not prefix-stable — a byte-level BPE can merge the template's
    `\\n` with a reply's leading space into one token, so the prompt's last token is not a prefix of
    the conversation — the conversation is encoded with template text and contents apart
    (`encode_chat(apart=True)`), which is, and which also ends the prompt where generation does."""
    full = encode_chat(tok, messages, where=where, apart=apart)
    trainable = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InputDataError(f"{where}: message 0 is an assistant turn before any user turn "
                                 "(nothing for it to reply to)")
        prefix = encode_chat(tok, messages[:i], add_generation_prompt=True, where=where, apart=apart)
        upto = encode_chat(tok, messages[: i + 1], where=where, apart=apart)
        if upto[: len(prefix)] != prefix or full[: len(upto)] != upto:
            if not apart:
                return render_conversation(tok, messages, where, apart=True)
            raise InputDataError(
                f"{where}: the chat template does not render turn {i} as a prefix of the conversation, even "
                "with template text and contents encoded apart; assistant-only masking needs a prefix-stable template"
            )
        for t in range(len(prefix), len(upto)):
            trainable[t] = True
    # Shift: position t predicts token t+1; the label is kept only when that token is the assistant's.
    labels = [full[t + 1] if trainable[t + 1] else IGNORE for t in range(len(full) - 1)] + [IGNORE]
    return ChatExample(full, labels)


ACCEPTED_FORMATS = ("JSON lines: .jsonl, .ndjson, or .json holding one record per line; optionally "
                    "gzipped (.gz)")


def check_input_file(path: Path, label: str) -> None:
    """Refuse, naming the file, what SFT/DPO cannot read as JSON lines: a hub dataset, a JSON array,
    parquet, text or an unknown suffix, or a file that does not exist."""
    if str(path).startswith(HUB_SCHEME) or label.startswith(HUB_SCHEME):
        raise InputDataError(f"{label}: a Hugging Face hub dataset; SFT and DPO read files only "
                             f"({ACCEPTED_FORMATS}), local or s3://. Export it, e.g. "
                             "`load_dataset(name, split='train').to_json('chat.jsonl')`, and name that file")
    fmt = format_of(path.name)
    if fmt == "json" and path.is_file() and is_json_array(path):
        raise InputDataError(f"{label}: a JSON array; SFT and DPO read {ACCEPTED_FORMATS}. Write one record "
                             f"per line, e.g. `jq -c '.[]' {path.name} > {path.name.split('.')[0]}.jsonl`")
    if fmt not in ("jsonl", "json"):
        what = {"parquet": "a parquet file", "text": "a text file"}.get(fmt or "", "an unknown format")
        raise InputDataError(f"{label}: {what}; SFT and DPO read {ACCEPTED_FORMATS}. Leave it out of the "
                             "input (e.g. name the files with a glob such as 'chat/*.jsonl')")
    if not path.is_file():
        raise InputDataError(f"{label}: no such file")


_LOGGED_SKIPS = 20  # skipped records logged one by one; all are counted in the SkipReport


def _skip(report: SkipReport, reason: str, where: str, detail: str) -> None:
    report.add(reason, where, detail)
    if report.total <= _LOGGED_SKIPS:
        log.warning("%s: record skipped: %s (%s)", where, reason, detail)
    elif report.total == _LOGGED_SKIPS + 1:
        log.warning("more records skipped: counted in the report, not logged")


def read_records(paths: Iterable[Path], parse: Callable[[Any, str], T], report: SkipReport,
                 on_bad_record: str = "skip", labels: Mapping[Path, str] | None = None) -> Iterator[T]:
    """Stream `parse(record, "file:line")` over JSON-lines files (gzipped or not) with one bad-record
    policy: a line that is not UTF-8 or JSON, or that `parse` rejects, is skipped and counted in
    `report` with the reason and what was wrong ("skip"), or stops the stage naming the file and line
    ("fail"). A UTF-8 byte-order mark at the start of a file is ignored. Any other error while one record
    is parsed or rendered (e.g. from the chat template) is that record's: skipped as `record_error` with
    the exception's text, or the failure.

    Every file is checked before any is read (`check_input_file`): a format other than JSON lines is
    refused naming the file. `labels` maps a path to the name messages give it (e.g. the s3:// URI a
    staged file came from); by default the path itself. A file that cannot be read to its end (a
    truncated gzip) fails naming the file and the line where it broke."""
    files = [(Path(p), labels.get(p, str(p)) if labels else str(p)) for p in paths]
    for path, label in files:
        check_input_file(path, label)
    return _read_lines(files, parse, report, on_bad_record)


def _read_lines(files: list[tuple[Path, str]], parse: Callable[[Any, str], T], report: SkipReport,
                on_bad_record: str) -> Iterator[T]:
    for path, label in files:
        with open_binary(path) as f:
            lineno = 0
            while True:
                try:
                    raw = f.readline()
                except READ_ERRORS as e:
                    raise unreadable(label, f"line {lineno}", e) from e
                if not raw:
                    break
                lineno += 1
                where = f"{label}:{lineno}"
                if lineno == 1:
                    raw = raw.removeprefix(_BOM)
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    value = parse(json.loads(line), where)
                except (InputDataError, json.JSONDecodeError, UnicodeDecodeError) as e:
                    if isinstance(e, InputDataError):
                        detail = str(e).removeprefix(f"{where}: ")
                    elif isinstance(e, UnicodeDecodeError):
                        detail = f"not UTF-8: byte {e.start} of the line ({e.reason})"
                    else:
                        detail = f"not valid JSON: {e}"
                    if on_bad_record == "fail":
                        raise InputDataError(f"{where}: {detail}") from None
                    _skip(report, _reason(e), where, detail)
                    continue
                except MemoryError:
                    raise
                except Exception as e:  # any other per-record failure names its record
                    detail = f"{type(e).__name__}: {str(e)[:200]}"
                    if on_bad_record == "fail":
                        raise InputDataError(f"{where}: this record could not be processed ({detail})") from e
                    _skip(report, "record_error", where, detail)
                    continue
                yield value


def read_chat_jsonl(paths: Iterable[Path], tok: Any, max_len: int, report: SkipReport,
                    on_bad_record: str = "skip", labels: Mapping[Path, str] | None = None) -> Iterator[ChatExample]:
    """Stream rendered conversations; bad records are skipped and counted or raise (policy). `labels`:
    the names files are given in messages (see `read_records`)."""

    def parse(rec: Any, where: str) -> ChatExample:
        if not isinstance(rec, dict) or "messages" not in rec:
            got = (f"an object with keys {', '.join(map(repr, sorted(rec)[:10]))}" if isinstance(rec, dict)
                   else type(rec).__name__)
            raise InputDataError(f"{where}: expected an object with a 'messages' list, got {got}")
        ex = render_conversation(tok, validate_messages(rec["messages"], where), where)
        if len(ex.input_ids) > max_len:
            raise InputDataError(f"{where}: conversation is {len(ex.input_ids)} tokens, longer than the "
                                 f"context ({max_len}); it is not truncated")
        return ex

    return read_records(paths, parse, report, on_bad_record, labels)


# substring of an InputDataError's text -> the reason it is counted under in a SkipReport
_REASONS = (
    ("unknown role", "unknown_role"), ("no assistant turn", "no_assistant_turn"),
    ("longer than the context", "longer_than_the_context"), ("empty content", "empty_content"),
    ("content must be text", "content_not_text"), ("before any user turn", "assistant_before_user"),
    ("identical pair", "identical_pair"), ("empty prompt", "empty_prompt"),
    ("'prompt' must be text", "prompt_not_text_or_messages"),
    ("prompt ends with an assistant turn", "prompt_ends_with_assistant"),
    ("prompt has no user turn", "prompt_without_user_turn"),
    ("which is not supported here", "unsupported_message_key"),
    ("contains special-token text", "special_token_text"),
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
    """Next-fit packing in data order: a pack closes as soon as the next conversation does not fit (no
    search of earlier packs, so the order is kept); padding has label IGNORE and its own doc id."""
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
