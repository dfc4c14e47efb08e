"""Load and validate the bundled evaluation items (the demo world's held-out files).

The lm-eval task YAMLs in `kubellm/evaluate/tasks/` load their documents through
`custom_dataset: !function utils.load_<task>`, which lands here. The data directory is, in order:
the task metadata key `kubellm_eval_dir` (the stage passes `evaluate.eval_dir` through
`TaskManager(metadata=...)`; on the CLI: `--metadata '{"kubellm_eval_dir": "/path"}'`), the
environment variable `KUBELLM_EVAL_DIR`, else the small files shipped in `tasks/data/`. Paths never
depend on the working directory, so `lm_eval --include_path <tasks dir>` works from anywhere.

File schemas (one JSON object per line; the data engineer's demo-world generator writes them):
    knowledge.jsonl   {"question": str, "choices": [str, ...], "answer": int}
    format.jsonl      {"messages": [{"role": "user", "content": str}, ...], "answer": str,
                       "value": str (optional: what `format_regex` captures from "answer"),
                       "format_regex": str (optional, one capture group)}
    preference.jsonl  {"prompt": str, "chosen": str, "rejected": str}

A malformed row stops the load with an InputDataError naming the file, the line and the field:
scoring a task on silently dropped rows would make its number incomparable with the baseline's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubellm.core.errors import InputDataError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_DATA_DIR = TASKS_DIR / "data"
ENV_DATA_DIR = "KUBELLM_EVAL_DIR"
METADATA_KEY = "kubellm_eval_dir"

# bundled task name -> the data file it reads
TASK_FILES = {
    "kubellm_knowledge": "knowledge.jsonl",
    "kubellm_format": "format.jsonl",
    "kubellm_preference": "preference.jsonl",
}


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where the eval items are read from (see the module docstring for the order)."""
    d = override or os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR
    return Path(d).expanduser().resolve()


def _str(row: dict[str, Any], field: str, where: str) -> str:
    v = row.get(field)
    if not isinstance(v, str) or not v.strip():
        raise InputDataError(f"{where}: field {field!r} must be a non-empty string (got {v!r:.60})")
    return v


def check_knowledge(row: dict[str, Any], where: str) -> dict[str, Any]:
    question = _str(row, "question", where)
    choices = row.get("choices")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise InputDataError(f"{where}: field 'choices' must be a list of ≥ 2 non-empty strings (got {choices!r:.80})")
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InputDataError(
            f"{where}: field 'answer' must be an integer index into 'choices' (0..{len(choices) - 1}), got {answer!r}"
        )
    return {"question": question, "choices": choices, "answer": answer}


def captured(m: re.Match[str] | None) -> str:
    """What a `format_regex` match captured: its first group (the whole match without one), stripped;
    "" for no match, or an optional group that took no part in it."""
    if m is None:
        return ""
    return ((m.group(1) if m.groups() else m.group(0)) or "").strip()


def check_format(row: dict[str, Any], where: str) -> dict[str, Any]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputDataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise InputDataError(
                f"{where}: messages[{j}] must be {{'role': system|user|assistant, 'content': str}} (got {m!r:.80})"
            )
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise InputDataError(f"{where}: 'messages' has no non-empty user turn to prompt with")
    answer = _str(row, "answer", where)
    regex = row.get("format_regex")
    if regex is not None:
        try:
            re.compile(regex)
        except (re.error, TypeError) as e:
            raise InputDataError(f"{where}: field 'format_regex' is not a valid regular expression: {e}") from None
    value = row.get("value")
    if value is not None and not isinstance(value, str):
        raise InputDataError(f"{where}: field 'value' must be a string (got {value!r:.60})")
    if regex and not value and re.search(regex, answer.strip()) is None:
        raise InputDataError(f"{where}: no 'value' and 'format_regex' does not match the item's own 'answer' "
                             f"({answer!r:.60}): give the expected captured 'value', or a regex the answer follows")
    if regex and value and (got := captured(re.search(regex, answer.strip()))) != value.strip():
        raise InputDataError(f"{where}: 'format_regex' captures {got!r} from the item's own 'answer' ({answer!r:.60}), "
                             f"not its 'value' {value!r}: the gold reply would score correct = 0; fix the value or "
                             "the regex")
    # The harness builds the chat itself (system instruction, few-shot turns, this user turn), so the
    # task prompts with the last user turn; earlier turns are kept for reference only.
    return {"messages": messages, "prompt": users[-1], "answer": answer, "value": value or "",
            "format_regex": regex or ""}


def check_preference(row: dict[str, Any], where: str) -> dict[str, Any]:
    prompt = _str(row, "prompt", where)
    chosen = _str(row, "chosen", where)
    rejected = _str(row, "rejected", where)
    if chosen == rejected:
        raise InputDataError(f"{where}: 'chosen' equals 'rejected' (the pair cannot measure a preference)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


CHECKS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "kubellm_knowledge": check_knowledge,
    "kubellm_format": check_format,
    "kubellm_preference": check_preference,
}


def read_items(task: str, directory: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The validated rows of a bundled task's data file."""
    if task not in TASK_FILES:
        raise InputDataError(f"{task!r} is not a bundled kubellm task; known: {', '.join(TASK_FILES)}")
    path = data_dir(directory) / TASK_FILES[task]
    if not path.is_file():
        raise InputDataError(f"{path}: eval data file for task {task} not found (eval dir {path.parent})")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append(CHECKS[task](row, where))
    if not rows:
        raise InputDataError(f"{path}: no items (task {task} would score nothing)")
    return rows


def load_dataset(task: str, **metadata: Any) -> Any:
    """What a task YAML's `custom_dataset` returns: a DatasetDict with one `test` split.

    lm-eval calls it with the task's metadata (plus, from the CLI, the model args) as keywords."""
    import datasets

    rows = read_items(task, metadata.get(METADATA_KEY))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
